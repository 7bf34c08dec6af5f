"""Reading safetensors weights straight into the precision they will run in.

``safetensors.torch.load_file`` maps the whole file and returns every tensor in the file's dtype: loading
the released 3.46 GB float32 UNet into bfloat16 then holds the float32 copy (its mapped pages count as
resident memory) beside the bfloat16 one. Here each tensor is read with plain file reads into its own
buffer and cast before the next one is read: the peak is the cast model plus one tensor, and the file's
pages stay in the page cache, not in the process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection

import torch

from .errors import DiffDISError

# safetensors dtype names -> torch (the ones weights use)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: str | os.PathLike, dtype: torch.dtype | None = None,
                     keep_dtype: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, floating ones cast to ``dtype`` (None: the file's) one at a time,
    except those named in ``keep_dtype``. The file must have been checked whole (``safetensors_shapes``)."""
    path = os.fspath(path)
    state = {}
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        data_start = 8 + header_len
        # In file order: the reads go forward through the file.
        for key, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            file_dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
            if file_dtype is None:
                raise DiffDISError(f"{path}: tensor {key} has dtype {entry['dtype']}, which weights never have")
            begin, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=file_dtype)
            if end > begin:
                f.seek(data_start + begin)
                buffer = tensor.reshape(-1).view(torch.uint8).numpy()
                if f.readinto(buffer) != end - begin:
                    raise DiffDISError(f"{path} is truncated (tensor {key})")
            if dtype is not None and tensor.is_floating_point() and key not in keep_dtype:
                tensor = tensor.to(dtype)
            state[key] = tensor
    return state
