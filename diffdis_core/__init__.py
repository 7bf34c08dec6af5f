"""DiffDIS (ICLR 2025) one-step dichotomous image segmentation on stock diffusers.

``DiffDISPipeline.from_pretrained(...)(image).mask`` gives the foreground mask; ``python -m diffdis_core``
cuts out images from the command line.
"""

from .errors import DiffDISError
from .pipeline import DiffDISCondition, DiffDISLatents, DiffDISOutput, DiffDISPipeline, SegmentationView
from .unet import DiffDISUNet

__all__ = [
    "DiffDISCondition", "DiffDISError", "DiffDISLatents", "DiffDISOutput", "DiffDISPipeline", "DiffDISUNet",
    "SegmentationView",
]
