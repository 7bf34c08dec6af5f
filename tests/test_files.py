"""diffdis_core.files: whole files or none, never through a planted link, readable as the umask says."""

import os
import stat
import tempfile
import threading

import pytest
from diffdis_core import files


def test_a_failed_write_leaves_the_target_and_no_temporary(tmp_path):
    target = tmp_path / "result.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), files.atomic_write(target) as stream:
        stream.write(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["result.png"]


def test_concurrent_writers_all_finish_and_the_target_is_one_of_them_whole(tmp_path):
    target = tmp_path / "result.bin"
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    errors = []

    def write(data):
        try:
            for _ in range(5):
                files.write_bytes_atomic(target, data)
        except Exception as error:  # noqa: BLE001 - any error fails the test below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and target.read_bytes() in payloads and os.listdir(tmp_path) == ["result.bin"]


def test_a_link_planted_at_a_temporary_name_is_never_followed(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = tmp_path / "out" / "result.png"
    target.parent.mkdir()
    prefix, suffix = files.temporary_name_pattern(target)
    planted = target.parent / f"{prefix}fixed{suffix}"
    planted.symlink_to(victim)
    names = iter(["fixed", "fixed", "other"])  # the planted name comes up first, twice
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: names)
    files.write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new" and victim.read_text() == "keep me" and planted.is_symlink()


def test_files_and_folders_get_the_umask_permissions_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        files.write_bytes_atomic(tmp_path / "a.bin", b"x")
        folder = files.make_temporary_folder(tmp_path / "checkpoint")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755 and folder.parent == tmp_path


def test_what_a_library_wrote_0600_gets_the_umask_permissions(tmp_path):
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "checkpoint" / "unet"
    folder.mkdir(parents=True, mode=0o700)
    save_file({"w": torch.zeros(1)}, folder / "weights.safetensors")  # safetensors writes 0600
    old = os.umask(0o027)
    try:
        files.apply_umask(tmp_path / "checkpoint")
    finally:
        os.umask(old)
    assert stat.S_IMODE((folder / "weights.safetensors").stat().st_mode) == 0o640
    assert stat.S_IMODE(folder.stat().st_mode) == stat.S_IMODE(folder.parent.stat().st_mode) == 0o750
