"""DiffDIS (ICLR 2025) one-step dichotomous image segmentation on stock diffusers.

``DiffDISPipeline.from_pretrained(...)(image).mask`` gives the foreground mask; ``python -m diffdis_core``
cuts out images from the command line.

Attributes are imported on first use: ``diffdis_core.spec``, ``.devices`` and ``.errors`` stay light
(no diffusers), so front ends can import them at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import DiffDISError

_LAZY = {
    "DiffDISCondition": "pipeline", "DiffDISLatents": "pipeline", "DiffDISOutput": "pipeline",
    "DiffDISPipeline": "pipeline", "SegmentationView": "pipeline", "DiffDISUNet": "unet",
    "cutout_rgba": "cutout", "estimate_foreground": "matting", "refine_alpha": "matting",
}

if TYPE_CHECKING:
    from .cutout import cutout_rgba
    from .matting import estimate_foreground, refine_alpha
    from .pipeline import DiffDISCondition, DiffDISLatents, DiffDISOutput, DiffDISPipeline, SegmentationView
    from .unet import DiffDISUNet


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DiffDISError", *_LAZY]
