"""Where model files come from: local folders, single files, or the Hugging Face Hub.

Every download goes through huggingface-hub and fetches only the files needed. Any failure becomes a
``DiffDISError`` that says which files to put in which folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .errors import DiffDISError
from .spec import DEFAULT_BASE, DEFAULT_MODEL, EMPTY_EMBED_FILE, EMPTY_EMBED_KEY, UNET_WEIGHTS_NAMES  # noqa: F401

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

LAYOUT_HELP = (
    "a DiffDIS model folder holds unet/config.json + unet/diffusion_pytorch_model.safetensors, "
    "vae/config.json + vae/diffusion_pytorch_model.safetensors, scheduler/scheduler_config.json, and either "
    f"{EMPTY_EMBED_FILE} or text_encoder/ + tokenizer/ (from {DEFAULT_MODEL} or {DEFAULT_BASE} on Hugging Face)"
)

HUB_KWARGS = ("cache_dir", "local_files_only", "revision", "token")


def is_repo_id(name: str | os.PathLike) -> bool:
    """A Hugging Face repo id ("owner/name") that is not an existing local path."""
    name = os.fspath(name)
    return bool(_REPO_ID.match(name)) and not os.path.exists(name)


def _hub_error(repo: str, what: str, error: Exception) -> DiffDISError:
    return DiffDISError(
        f"could not get {what} from Hugging Face repo '{repo}' ({type(error).__name__}); "
        f"when offline, download them by hand and pass the folder instead: {LAYOUT_HELP}")


def download(repo: str, patterns: list[str], local_dir: str | os.PathLike | None = None, **hub_kwargs: Any) -> Path:
    """Download only ``patterns`` of ``repo`` (into the HF cache, or ``local_dir``) and return the folder."""
    from huggingface_hub import snapshot_download

    kwargs = {k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS and v is not None}
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_dir=local_dir, **kwargs))
    except Exception as error:  # network, auth, missing repo, offline cache miss
        raise _hub_error(repo, ", ".join(patterns), error) from None


def resolve_unet_files(
    location: str | os.PathLike, subfolder: str | None = None, **hub_kwargs: Any
) -> tuple[Path | None, Path]:
    """Return (config.json or None, weights .safetensors) for a UNet folder, file or repo."""
    if is_repo_id(location):
        prefix = f"{subfolder}/" if subfolder else ""
        location = download(os.fspath(location), [f"{prefix}config.json", f"{prefix}*.safetensors"], **hub_kwargs)
    path = Path(location)
    if path.is_file():
        config = path.with_name("config.json")
        return (config if config.is_file() else None), path
    if not path.is_dir():
        raise DiffDISError(f"{path} does not exist: give a DiffDIS model folder, a UNet .safetensors file "
                           f"or a Hugging Face repo id such as {DEFAULT_MODEL}")
    folder = path / subfolder if subfolder and (path / subfolder).is_dir() else path
    for name in UNET_WEIGHTS_NAMES:
        if (folder / name).is_file():
            config = folder / "config.json"
            return (config if config.is_file() else None), folder / name
    pickled = sorted(p.name for p in folder.glob("*") if p.suffix in {".bin", ".ckpt", ".pt", ".pth"})
    if pickled:
        raise DiffDISError(f"{folder} has only {pickled[0]}: DiffDIS loads .safetensors weights only "
                           "(pickled files can run code); convert it or download the safetensors version")
    raise DiffDISError(f"no UNet weights in {folder}: expected {UNET_WEIGHTS_NAMES[0]}; {LAYOUT_HELP}")
