"""The ground floor for files: every file the project writes, and every model file it reads, goes through here.

Reads: JSON configs and safetensors headers are read here and nowhere else, within size and nesting bounds
(a hostile or damaged file costs no more memory than a good one), and pickled weights are refused here
(they can run code). Every failure is one ``DiffDISError`` line naming the file and what to do, an
unreadable file (``PermissionError``) included.

Writes are rsync's temp-and-rename: a uniquely named temporary file is created exclusively
(``O_CREAT | O_EXCL``: it never opens or follows a link left at that name) in the target's own folder,
filled, given the permissions the user's umask asks for (not ``mkstemp``'s 0600, so a model trained
under one account loads under another), and renamed over the target in one step. Readers therefore see
the old file or the new one, never a torn one; two writers of one target both succeed, and the target
ends as one of them wrote it whole; a crash leaves at most a hidden ``.<name>.*.tmp`` behind.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import DiffDISError

# A released config is 1-3 KB and 3 levels deep (a scheduler's trained_betas list: about 25 KB); the bounds
# leave a wide margin and keep a hostile file from costing memory or a RecursionError.
MAX_JSON_BYTES = 1 << 20
MAX_JSON_DEPTH = 16
# The SD UNet's safetensors header is about 100 KB (686 tensors); safetensors itself allows 100 MB.
MAX_SAFETENSORS_HEADER_BYTES = 16 << 20
# Weights formats that are Python pickles: loading one can run code, so they are never opened.
# safetensors dtype names -> torch attribute names (the ones weights use)
SAFETENSORS_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                            "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
# Bytes per element of the safetensors dtypes (sub-byte float types are not size-checked).
SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2,
                           "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8,
                           "F64": 8, "C64": 8}


# ---------------------------------------------------------------------------------------------- reading
def damaged_file_remedy(path: str | os.PathLike) -> str:
    """What to do with a damaged file: a Hugging Face cache file is fetched again once deleted; a
    local one (a copy, a training checkpoint) must be replaced."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        in_cache = os.path.abspath(path).startswith(os.path.abspath(HF_HUB_CACHE) + os.sep)
    except ImportError:
        in_cache = False
    if in_cache:
        return "delete it from the Hugging Face cache and run again to download it anew"
    return "replace it with a complete copy"


def _denied_on_the_way(path: str | os.PathLike) -> Path:
    """The outermost folder on the way to ``path`` that this process may not enter, else ``path`` itself:
    what the user has to make readable (the OS names the file it was opening, not the folder in the way)."""
    path = Path(os.path.abspath(path))
    effective = os.access in os.supports_effective_ids  # the account's rights, also under a changed euid
    for folder in reversed(path.parents):
        if not os.access(folder, os.X_OK, effective_ids=effective):
            return folder
    return path


def cannot_read(path: str | os.PathLike, error: OSError) -> DiffDISError:
    """The one line for a file or folder the OS will not read: what it said and what to do."""
    if isinstance(error, PermissionError):
        path = _denied_on_the_way(path)
        fix = "chmod -R a+rX" if os.path.isdir(path) else "chmod a+r"
        return DiffDISError(f"{path}: this account may not read it (permission denied); make it readable, e.g. "
                            f"{fix} '{path}' (safetensors writes weights private to the account that wrote them)")
    return DiffDISError(f"{path}: cannot read it ({error.strerror or error}); {damaged_file_remedy(path)}")


@contextlib.contextmanager
def read_errors_named(path: str | os.PathLike | None = None) -> Iterator[None]:
    """Inside, an ``OSError`` (an unreadable folder or file, an I/O error) becomes ``cannot_read`` of the
    file the OS names (else ``path``). Also a decorator."""
    try:
        yield
    except OSError as error:
        where = error.filename if error.filename is not None else path
        if where is None:
            raise
        raise cannot_read(where, error) from None


def read_bytes_bounded(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """The content of ``path``, refused when larger than ``limit`` bytes (never read whole then)."""
    with read_errors_named(path), open(path, "rb") as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise DiffDISError(f"{path} is larger than any {what} ({limit:,} bytes at most); it is damaged or not "
                           f"one: {damaged_file_remedy(path)}")
    return data


def _json_depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (iterative: no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json_bounded(data: bytes, path: str | os.PathLike, what: str = "config") -> Any:
    """JSON ``data`` read from ``path``, nested at most ``MAX_JSON_DEPTH`` deep; one line otherwise."""
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise DiffDISError(f"{path} is not a text file; {damaged_file_remedy(path)}") from None
    except json.JSONDecodeError as error:
        raise DiffDISError(f"{path} is not valid JSON (line {error.lineno}: {error.msg}); "
                           f"{damaged_file_remedy(path)}") from None
    except (ValueError, RecursionError) as error:  # a number too long to convert, or nesting past Python's limit
        why = "is nested too deeply" if isinstance(error, RecursionError) else f"is not valid JSON ({error})"
        raise DiffDISError(f"{path} {why}; {damaged_file_remedy(path)}") from None
    if _json_depth(value) > MAX_JSON_DEPTH:
        raise DiffDISError(f"{path} is nested more than {MAX_JSON_DEPTH} levels deep, no {what} is; "
                           f"{damaged_file_remedy(path)}")
    return value


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object file (a config), within ``MAX_JSON_BYTES`` and ``MAX_JSON_DEPTH``; a DiffDISError
    naming the file and what is wrong otherwise."""
    value = parse_json_bounded(read_bytes_bounded(path, MAX_JSON_BYTES, "config file"), path)
    if not isinstance(value, dict):
        raise DiffDISError(f"{path} holds a JSON {type(value).__name__}, not a config object; "
                           f"{damaged_file_remedy(path)}")
    return value


def pickle_refusal(path: str | os.PathLike) -> DiffDISError:
    return DiffDISError(f"{path}: DiffDIS loads .safetensors weights only (pickled files can run code); "
                        "convert it or download the safetensors version")


def find_weights(folder: str | os.PathLike, names: tuple[str, ...] | list[str]) -> Path | None:
    """The first of ``names`` (safetensors files) in ``folder``; None when there is none, and a
    DiffDISError when the folder holds only pickled weights."""
    folder = Path(folder)
    with read_errors_named(folder):
        for name in names:
            if (folder / name).is_file():
                return folder / name
        pickled = sorted(p.name for p in folder.glob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise pickle_refusal(folder / pickled[0])
    return None


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header (no tensor read), after checking the file is
    whole: every tensor's bytes lie inside the file, back to back, to its last byte. Pickles (by name
    or by content), truncated, empty and foreign files are one line naming the file."""
    return {name: shape for name, (_, shape, _, _) in safetensors_layout(path)[0].items()}


def safetensors_layout(path: str | os.PathLike) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], int]:
    """The checked header (see ``safetensors_shapes``): name -> (dtype name, shape, begin, end) of its bytes
    after the header, and the offset where those bytes start."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise pickle_refusal(path)
    with read_errors_named(path):
        stat = path.stat()
    return _safetensors_layout(path, stat.st_size, stat.st_mtime_ns, stat.st_ino)


@functools.lru_cache(maxsize=8)  # a loader checks a file, then loads it: read its header once
def _safetensors_layout(path: Path, size: int, mtime_ns: int, inode: int
                        ) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], int]:
    def damaged(why: str) -> DiffDISError:
        return DiffDISError(f"{path} {why}; {damaged_file_remedy(path)}")

    if size == 0:
        raise damaged("is empty")
    with read_errors_named(path), open(path, "rb") as stream:
        head = stream.read(8)
        header_length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if header_length < 2 or header_length > min(size - 8, MAX_SAFETENSORS_HEADER_BYTES):
            if size <= 8:
                raise damaged(f"is truncated ({size} bytes)")
            # torch.save writes a zip archive, older torch a raw pickle: named, never opened.
            kind = "a pickle/zip archive" if head[:2] == b"PK" or head[:1] == b"\x80" else "something else"
            raise damaged(f"is not a safetensors file (it looks like {kind})")
        text = stream.read(header_length)
    if not text.startswith(b"{"):
        raise damaged("is not a safetensors file (its header is not a JSON object)")
    header = parse_json_bounded(text, path, "safetensors header")
    shapes, spans = {}, []
    try:
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            shape, (begin, end) = entry["shape"], entry["data_offsets"]
            if not all(isinstance(n, int) and n >= 0 for n in [*shape, begin, end]) or begin > end:
                raise ValueError(name)
            width = SAFETENSORS_DTYPE_BYTES.get(entry["dtype"])
            if width is not None and math.prod(shape) * width != end - begin:
                raise ValueError(name)
            shapes[name] = (entry["dtype"], tuple(shape), begin, end)
            spans.append((begin, end))
    except (AttributeError, KeyError, TypeError, ValueError):
        raise damaged("has a damaged header (not valid safetensors JSON)") from None
    spans.sort()
    if any(a[1] != b[0] for a, b in zip(spans, spans[1:])) or (spans and spans[0][0] != 0):
        raise damaged("has a damaged header (its tensors overlap or leave gaps)")
    expected = 8 + header_length + (spans[-1][1] if spans else 0)
    if size < expected:
        raise damaged(f"is truncated: {size:,} of {expected:,} bytes (an interrupted write or copy?)")
    if size > expected:
        raise damaged(f"has {size - expected:,} bytes more than its header describes")
    return shapes, 8 + header_length


def read_safetensors(path: str | os.PathLike, dtype: Any = None, keep_dtype: Collection[str] = (),
                     memory_format: Any = None, include: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """The tensors of a checked safetensors file (those ``include`` accepts: all by default), floating ones
    cast to ``dtype`` (None: the file's) except those named in ``keep_dtype``, 4-D ones in ``memory_format``
    (the layout they will run in: ``torch.channels_last``), each made once, in its final form.

    ``safetensors.torch.load_file`` maps the whole file and returns every tensor in the file's dtype: loading
    the released 3.46 GB float32 UNet into bfloat16 would hold the float32 copy (its mapped pages count as
    resident memory) beside the bfloat16 one. Here each tensor is read with plain reads into one reused
    buffer and converted from there: the peak is the loaded model plus the largest tensor, and no freed
    float32 tensor or old-layout copy is left behind for the allocator to keep (they cost 0.75 GiB at the
    released UNet's size before).
    """
    import torch  # only loaders need it; front ends import this module at start-up

    layout, data_start = safetensors_layout(path)
    wanted = sorted(((name, entry) for name, entry in layout.items() if include is None or include(name)),
                    key=lambda item: item[1][2])
    scratch = torch.empty(max((end - begin for _, (_, _, begin, end) in wanted), default=0), dtype=torch.uint8)
    state = {}
    with read_errors_named(path), open(path, "rb") as stream:
        for name, (dtype_name, shape, begin, end) in wanted:
            file_dtype = getattr(torch, SAFETENSORS_TORCH_DTYPES.get(dtype_name, ""), None)
            if file_dtype is None:
                raise DiffDISError(f"{path}: tensor {name} has dtype {dtype_name}, which weights never have")
            raw = scratch[:end - begin]
            if end > begin:
                stream.seek(data_start + begin)
                if stream.readinto(raw.numpy()) != end - begin:
                    raise DiffDISError(f"{path} is truncated (tensor {name}); {damaged_file_remedy(path)}")
            tensor = raw.view(file_dtype).view(shape) if end > begin else torch.empty(shape, dtype=file_dtype)
            cast = dtype is not None and tensor.is_floating_point() and name not in keep_dtype
            four_d = memory_format is not None and tensor.dim() == 4
            made = torch.empty_like(tensor, dtype=dtype if cast else file_dtype,
                                    memory_format=memory_format if four_d else torch.contiguous_format)
            state[name] = made.copy_(tensor)
    return state


def _umask() -> int:
    """The process's umask, read without changing it where the OS tells (Linux); elsewhere set and
    restored at once."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temporary_name_pattern(target: str | os.PathLike) -> tuple[str, str]:
    """(prefix, suffix) of the temporary files ``atomic_write`` makes for ``target``."""
    return f".{Path(target).name}.", ".tmp"


@contextlib.contextmanager
def atomic_write(target: str | os.PathLike, mode: int = 0o666) -> Iterator[BinaryIO]:
    """Open a new, exclusively created temporary file beside ``target`` for binary writing; on a clean
    exit it is flushed to disk, given ``mode`` less the umask and renamed to ``target``; on an error it
    is removed and ``target`` is untouched."""
    target = Path(target)
    prefix, suffix = temporary_name_pattern(target)
    descriptor, temporary = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
            os.fchmod(stream.fileno(), mode & ~_umask())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    """``target``'s content becomes ``data``, whole or not at all (see ``atomic_write``)."""
    with atomic_write(target) as stream:
        stream.write(data)


def make_temporary_folder(target: str | os.PathLike) -> Path:
    """A new, exclusively created, empty folder beside ``target`` (to fill, then ``os.replace`` onto
    ``target``), with the permissions the umask asks for (not ``mkdtemp``'s 0700)."""
    target = Path(target)
    prefix, suffix = temporary_name_pattern(target)
    folder = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=target.parent))
    folder.chmod(0o777 & ~_umask())
    return folder


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a folder, everything in it) the permissions the umask asks for: for what a
    library wrote into a temporary folder of ours (safetensors' ``save_file`` makes its files 0600)."""
    path = Path(path)
    mask = _umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)
