"""diffdis_core.files: whole files or none, never through a planted link, readable as the umask says."""

import json
import os
import stat
import tempfile
import threading

import pytest
import torch
from safetensors.torch import save_file

from diffdis_core import DiffDISError, files


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


# ---------------------------------------------------------------------------------------------- reading
def one_line(call, match):
    with pytest.raises(DiffDISError, match=match) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


def test_safetensors_headers_are_read_and_checked_without_the_tensors(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}, str(path))
    assert files.safetensors_shapes(path) == {"a": (2, 3), "b": (4,)}
    data = path.read_bytes()
    path.write_bytes(data + b"x")
    one_line(lambda: files.safetensors_shapes(path), "has 1 bytes more than its header describes")
    path.write_bytes(data[:-1])
    one_line(lambda: files.safetensors_shapes(path), f"is truncated: {len(data) - 1:,} of {len(data):,} bytes")


@pytest.mark.parametrize("header, expected", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2],
                                                                        "data_offsets": [4, 12]}}, "overlap"),
    ({"a": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 8]}}, "damaged header"),
    ({"a": {"dtype": "F32", "shape": "big", "data_offsets": [0, 8]}}, "damaged header"),
    ([1, 2], "its header is not a JSON object"),
])
def test_a_damaged_safetensors_header_is_one_line(tmp_path, header, expected):
    path = tmp_path / "w.safetensors"
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + bytes(12))
    one_line(lambda: files.safetensors_shapes(path), expected)


def test_a_safetensors_header_is_never_read_past_its_bound(tmp_path):
    path = tmp_path / "w.safetensors"
    length = files.MAX_SAFETENSORS_HEADER_BYTES + 1
    with open(path, "wb") as stream:
        stream.write(length.to_bytes(8, "little"))
        stream.truncate(8 + length + 16)  # sparse: a header that claims 16 MB
    one_line(lambda: files.safetensors_shapes(path), "is not a safetensors file")


def test_pickled_weights_are_never_opened(tmp_path, monkeypatch):
    def no_open(*args, **kwargs):
        raise AssertionError("a pickled file was opened")

    (tmp_path / "model.bin").write_bytes(b"\x80\x04not unpickled")
    monkeypatch.setattr("builtins.open", no_open)
    one_line(lambda: files.safetensors_shapes(tmp_path / "model.bin"), "loads .safetensors weights only")
    one_line(lambda: files.find_weights(tmp_path, ("model.safetensors",)), "model.bin: DiffDIS loads .safetensors")
    monkeypatch.undo()
    disguised = tmp_path / "model.safetensors"
    torch.save({"x": torch.zeros(2)}, disguised)  # a zip archive under a safetensors name
    one_line(lambda: files.safetensors_shapes(disguised), r"is not a safetensors file \(it looks like a pickle/zip")


@pytest.mark.parametrize("text, expected", [
    ("[1, 2]", "holds a JSON list, not a config object"),
    ("{,}", "is not valid JSON"),
    ('{"a": ' + "[" * 10**5 + "]" * 10**5 + "}", "is nested too deeply"),
    ('{"a": ' + "[" * 17 + "]" * 17 + "}", "is nested more than 16 levels deep"),
    ('{"a": ' + "9" * 5000 + "}", "is not valid JSON"),  # past Python's digit limit
    ('{"a": "' + "x" * files.MAX_JSON_BYTES + '"}', "is larger than any config file"),
])
def test_json_configs_are_read_within_bounds(tmp_path, text, expected):
    path = tmp_path / "config.json"
    path.write_text(text)
    assert one_line(lambda: files.read_json(path), expected).startswith(str(path))


def test_unreadable_files_name_the_folder_in_the_way(shared_tmp_path, denied_read):
    folder = shared_tmp_path / "model"
    (folder / "vae").mkdir(parents=True)
    (folder / "vae" / "config.json").write_text("{}")
    with denied_read(folder):
        message = one_line(lambda: files.read_json(folder / "vae" / "config.json"), "permission denied")
    assert message.startswith(f"{folder}: this account may not read it") and f"chmod -R a+rX '{folder}'" in message
    with denied_read(folder / "vae" / "config.json"):
        message = one_line(lambda: files.read_json(folder / "vae" / "config.json"), "permission denied")
    assert message.startswith(f"{folder / 'vae' / 'config.json'}: ") and "chmod a+r " in message


def test_the_core_modules_import_no_circle():
    """Every import between diffdis_core modules, at the top or inside a function, points one way."""
    import ast
    from pathlib import Path

    package = Path(files.__file__).parent
    graph = {}
    for source in package.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("diffdis_core")):
                module = (node.module or "").removeprefix("diffdis_core").lstrip(".")
                names = [module] if module else [alias.name for alias in node.names]
                imported.update(name.split(".")[0] for name in names if (package / f"{name}.py").is_file())
        graph[source.stem] = imported - {source.stem}

    def reaches(start, goal, seen):
        return any(n == goal or (n not in seen and not seen.add(n) and reaches(n, goal, seen)) for n in graph[start])

    circles = sorted(m for m in graph if reaches(m, m, set()))
    assert not circles, circles


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
