"""One-line, user-facing errors for bad node inputs (ComfyUI shows the message on the node)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements.txt"


def core() -> ModuleType:
    """The ``diffdis_core`` package, imported on first use (it pulls in diffusers). A missing or
    broken dependency becomes one line saying how to install the pack's requirements."""
    try:
        import diffdis_core
    except (ImportError, RuntimeError) as failure:  # diffusers reports broken optional imports as RuntimeError
        detail = (str(failure).strip().splitlines() or [""])[0]
        raise RuntimeError(f"DiffDIS could not import its dependencies ({type(failure).__name__}: {detail}); "
                           f"install them into ComfyUI's Python: {sys.executable} -m pip install -r {REQUIREMENTS}"
                           ) from failure
    return diffdis_core


def error(message: str) -> Exception:
    """A DiffDISError: ComfyUI shows its one-line message on the node."""
    return core().DiffDISError(message)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise error(f"{name} {value!r} is not one of {', '.join(map(str, choices))}")
    return value
