"""The DiffDIS ComfyUI nodes, on ComfyUI's V3 schema (``comfy_api.latest``). The pack's root
``__init__.py`` hands them to ComfyUI through ``comfy_entrypoint``.

Imported only relatively, as ``<pack>.nodes``: a top-level ``nodes`` is ComfyUI's own module.
Nothing heavy happens at import: the core (and diffusers) is imported when a node first runs.
"""

from comfy_api.latest import ComfyExtension, IO

from .apply_alpha import DiffDISApplyAlpha
from .cutout import DiffDISRemoveBackground
from .loader import DiffDISLoader
from .segmentation import DiffDISDecode, DiffDISEncodeCondition, DiffDISOneStepSegment, mark_edge_use
from .services import register_model_folder, register_prompt_handler

# Their schemas' node ids are stored in saved workflows: never rename them.
NODES: list[type[IO.ComfyNode]] = [DiffDISLoader, DiffDISEncodeCondition, DiffDISOneStepSegment, DiffDISDecode,
                                   DiffDISApplyAlpha, DiffDISRemoveBackground]


class DiffDISExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[IO.ComfyNode]]:
        return list(NODES)


def extension() -> DiffDISExtension:
    """The pack for ComfyUI: registers ComfyUI/models/diffdis (ComfyUI has read extra_model_paths.yaml by
    now) and Decode's on-prompt handler (auto needs ComfyUI's cache to know whether its edge output is
    used: segmentation.mark_edge_use)."""
    register_model_folder()
    register_prompt_handler(mark_edge_use)
    return DiffDISExtension()


__all__ = ["NODES", "DiffDISExtension", "extension"]
