"""The DiffDIS ComfyUI nodes (classic node API). The pack's root ``__init__.py`` exports the mappings.

Imported only relatively, as ``<pack>.nodes``: a top-level ``nodes`` is ComfyUI's own module.
Nothing heavy happens at import: the core (and diffusers) is imported when a node first runs.
"""

from .apply_alpha import DiffDISApplyAlpha
from .cutout import DiffDISRemoveBackground
from .loader import DiffDISLoader
from .segmentation import DiffDISDecode, DiffDISEncodeCondition, DiffDISOneStepSegment, mark_edge_use
from .services import register_model_folder, register_prompt_handler

# Node ids are stored in saved workflows: never rename them.
NODE_CLASS_MAPPINGS = {
    "DiffDISLoader": DiffDISLoader,
    "DiffDISEncodeCondition": DiffDISEncodeCondition,
    "DiffDISOneStepSegment": DiffDISOneStepSegment,
    "DiffDISDecode": DiffDISDecode,
    "DiffDISApplyAlpha": DiffDISApplyAlpha,
    "DiffDISRemoveBackground": DiffDISRemoveBackground,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DiffDISLoader": "Load DiffDIS",
    "DiffDISEncodeCondition": "DiffDIS Encode Condition",
    "DiffDISOneStepSegment": "DiffDIS One-Step Segment",
    "DiffDISDecode": "DiffDIS Decode Mask/Edge",
    "DiffDISApplyAlpha": "DiffDIS Apply Alpha",
    "DiffDISRemoveBackground": "DiffDIS Remove Background",
}

# Decode's auto mode needs ComfyUI's cache to tell whether its edge output is used (segmentation.mark_edge_use).
register_prompt_handler(mark_edge_use)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "register_model_folder"]
