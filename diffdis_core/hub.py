"""Where model files come from: local folders, single files, or the Hugging Face Hub.

Every download goes through huggingface-hub and fetches only the files needed. A name that looks
like a path (starts with ``.``, ``/`` or ``~``, has a file extension, or exists in part) is never
sent to the Hub. Failures are ``DiffDISError`` messages that name the option the user set (``--model``
on the command line, ``model=`` in Python; see ``option_names``) and the files each folder needs.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DiffDISError
from .files import find_weights
from .spec import MODEL_FOLDER_LAYOUT, UNET_WEIGHTS_NAMES, layout_help

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Endings that make a name a file, never a repo id ("owner/model.v2" stays a repo id).
FILE_EXTENSIONS = {".safetensors", ".sft", ".bin", ".ckpt", ".pt", ".pth", ".pkl", ".json", ".gguf", ".onnx"}

LAYOUT_HELP = f"a DiffDIS model folder holds {layout_help()}"

HUB_KWARGS = ("cache_dir", "local_files_only", "revision", "token")

# How the user named each source: the option of the front end in use (CLI: --model/--base).
PYTHON_OPTION_NAMES = {"model": "model=", "base": "base="}
_OPTION_NAMES: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("diffdis_option_names",
                                                                                      default=None)


@contextlib.contextmanager
def option_names(**names: str) -> Iterator[None]:
    """Name the options in error messages, with their separator: ``option_names(model="--model ")``."""
    token = _OPTION_NAMES.set({**(_OPTION_NAMES.get() or PYTHON_OPTION_NAMES), **names})
    try:
        yield
    finally:
        _OPTION_NAMES.reset(token)


def option(role: str) -> str:
    """How the user sets ``role`` ("model" or "base") in the front end in use: "--model ", "model=", ..."""
    return (_OPTION_NAMES.get() or PYTHON_OPTION_NAMES).get(role, role)


def looks_local(name: str | os.PathLike) -> bool:
    """A path rather than a repo id: starts with . / ~ (or is absolute), has a file extension, or
    exists in part (``models/DiffDIS`` with a ``models`` folder here)."""
    text = os.fspath(name)
    if text.startswith((".", "/", "~", "\\")) or os.path.isabs(text) or "\\" in text:
        return True
    if Path(text).suffix.lower() in FILE_EXTENSIONS:
        return True
    parts = Path(text).parts
    return any(os.path.lexists(Path(*parts[:i])) for i in range(1, len(parts) + 1))


def is_repo_id(name: str | os.PathLike) -> bool:
    """A Hugging Face repo id ("owner/name") that is not a local path."""
    name = os.fspath(name)
    return bool(_REPO_ID.match(name)) and not looks_local(name)


def local_path(name: str | os.PathLike, role: str | None = None) -> Path:
    """``name`` as an existing local path (``~`` expanded), else a DiffDISError saying what is missing."""
    path = Path(os.path.expanduser(os.fspath(name)))
    if path.exists():
        return path
    flag = option(role) if role else ""
    if os.path.lexists(path):
        raise DiffDISError(f"{flag}{name}: broken symbolic link (it points to {os.readlink(path)})")
    kind = "file" if path.suffix.lower() in FILE_EXTENSIONS else "folder"
    parent = next((p for p in path.parents if p.is_dir()), None)
    hint = ""
    if parent is not None:
        first = path.relative_to(parent).parts[0]
        with contextlib.suppress(OSError):
            names = {p.name.lower(): p.name for p in parent.iterdir()}
            close = difflib.get_close_matches(first.lower(), list(names), n=1, cutoff=0.6)
            if close:
                hint = f" (did you mean {parent / names[close[0]]}?)"
    raise DiffDISError(f"{flag}{name}: {kind} {path} does not exist{hint}")


def files_by_folder(patterns: list[str]) -> dict[str, list[str]]:
    """Download patterns -> the files each folder of a model needs ("" = the top folder)."""
    folders: dict[str, list[str]] = {}
    for pattern in patterns:
        folder, _, name = pattern.rpartition("/")
        bucket = folders.setdefault(folder, [])
        bucket += [n for n in (MODEL_FOLDER_LAYOUT.get(folder, [name]) if name == "*" else [name]) if n not in bucket]
    return folders


def _download_help(repo: str, patterns: list[str], role: str | None) -> str:
    """A few lines: the hf command that fetches ``patterns``, and what goes in which folder."""
    target = repo.split("/")[-1]
    folders = files_by_folder(patterns)
    includes = " ".join(f'--include "{folder}/*"' if folder else f'--include "{name}"'
                        for folder, names in folders.items() for name in (names if not folder else names[:1]))
    use = f"pass {option(role)}{target}" if role else f"use the folder {target}"
    lines = [f"  offline? on a machine online: hf download {repo} {includes} --local-dir {target}",
             f"  then {use}; it needs:"]
    lines += [f"    {folder}/: {', '.join(names)}" if folder else f"    {', '.join(names)}"
              for folder, names in folders.items()]
    return "\n".join(lines)


def download(repo: str, patterns: list[str], local_dir: str | os.PathLike | None = None, role: str | None = None,
             needed: list[str] | None = None, **hub_kwargs: Any) -> Path:
    """Download only ``patterns`` of ``repo`` (into the HF cache, or ``local_dir``) and return the folder.

    ``role`` ("model" or "base") names the user's option in the error message; ``needed``: the files
    the message lists (default ``patterns``; a pattern may ask for optional files too).
    """
    from huggingface_hub import snapshot_download

    kwargs = {k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS and v is not None}
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_dir=local_dir, **kwargs))
    except Exception as error:  # network, auth, missing repo, offline cache miss
        flag = option(role) if role else ""
        needed = needed or patterns
        what = ", ".join(dict.fromkeys(p.split("/")[0] + ("/" if "/" in p else "") for p in needed))
        raise DiffDISError(f"{flag}{repo}: could not get {what} from Hugging Face ({type(error).__name__})\n"
                           f"{_download_help(repo, needed, role)}") from None


def resolve_unet_files(
    location: str | os.PathLike, subfolder: str | None = None, role: str | None = "model", **hub_kwargs: Any
) -> tuple[Path | None, Path]:
    """Return (config.json or None, weights .safetensors) for a UNet folder, file or repo."""
    if is_repo_id(location):
        prefix = f"{subfolder}/" if subfolder else ""
        location = download(os.fspath(location), [f"{prefix}config.json", f"{prefix}*.safetensors"], role=role,
                            **hub_kwargs)
    path = local_path(location, role)
    if path.is_file():
        config = path.with_name("config.json")
        return (config if config.is_file() else None), path
    folder = path / subfolder if subfolder and (path / subfolder).is_dir() else path
    weights = find_weights(folder, UNET_WEIGHTS_NAMES)
    if weights is not None:
        config = folder / "config.json"
        return (config if config.is_file() else None), weights
    raise DiffDISError(f"no UNet weights in {folder}: expected {UNET_WEIGHTS_NAMES[0]} there or in {folder}/unet/; "
                       f"{LAYOUT_HELP}")
