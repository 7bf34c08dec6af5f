"""Shared test fixtures: the authors' tiny parity model (tests/fixtures/official_tiny)."""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import comfy_api_standin
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL_TINY = FIXTURES / "official_tiny"
OFFICIAL_TINY_MODES = FIXTURES / "official_tiny_modes"


@pytest.fixture(scope="session")
def official_tiny() -> Path:
    """The read-only fixture folder (a complete tiny DiffDIS model, processing resolution 64)."""
    return OFFICIAL_TINY


@pytest.fixture(scope="session")
def official_tiny_modes() -> Path:
    """The authors' TTA and ensembling outputs on the tiny model (processing resolution 256)."""
    return OFFICIAL_TINY_MODES


@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    """A writable copy of the tiny model folder (without the parity inputs/outputs)."""
    target = tmp_path / "tiny_model"
    shutil.copytree(OFFICIAL_TINY, target, ignore=shutil.ignore_patterns("inputs.*", "expected.*", "README.md"))
    return target


@pytest.fixture(scope="session")
def tiny_pipeline():
    """The tiny model loaded once (float32, CPU); tests must not modify it."""
    from diffdis_core import DiffDISPipeline

    return DiffDISPipeline.from_pretrained(OFFICIAL_TINY, base=None)


@pytest.fixture
def shared_tmp_path() -> Path:
    """A temporary folder every account may enter (tmp_path's parents are private to this one)."""
    folder = Path(tempfile.mkdtemp(prefix="diffdis-test-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def denied_read():
    """``with denied_read(path):`` the code inside may not read ``path`` (mode 000). Root reads anything,
    so as root the block runs with the effective uid of the account nobody (restored after); put ``path``
    under ``shared_tmp_path`` then, so nobody can reach it."""
    import pwd

    @contextlib.contextmanager
    def deny(path: Path):
        mode = path.stat().st_mode
        as_root = os.geteuid() == 0
        nobody = pwd.getpwnam("nobody").pw_uid if as_root else None
        path.chmod(0)
        try:
            if as_root:
                os.seteuid(nobody)
            yield
        finally:
            if as_root:
                os.seteuid(0)
            path.chmod(mode)

    return deny


# The pack imports ComfyUI's V3 node API; without ComfyUI the tests give it a stand-in (see there).
comfy_api_standin.install()
