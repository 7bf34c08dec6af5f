"""ComfyUI entry point of the DiffDIS node pack (this folder goes into ComfyUI/custom_nodes/, under any name).

ComfyUI imports this file as a package named after the folder's path, so everything inside is
imported relatively. The bundled ``diffdis_core`` package is made importable by that name without
putting this folder on ``sys.path``, where the pack's ``nodes`` package would shadow ComfyUI's own
top-level ``nodes`` module. Import is cheap: no model, no network, and the core (with diffusers) is
only imported when a node first runs. The nodes are written on ComfyUI's V3 schema
(``comfy_api.latest``); a ComfyUI without it is refused with one line in its log.
"""

import importlib.abc
import importlib.machinery
import logging
import os
import sys

MINIMUM_COMFYUI = "0.8.0"  # the oldest ComfyUI the pack is tested with; comfy_api.latest came in 0.3.48


class _BundledCoreFinder(importlib.abc.MetaPathFinder):
    """Resolves ``import diffdis_core`` to the copy shipped in this folder, and nothing else."""

    tag = "diffdis-bundled-core"  # recognised across reloads, when the class object differs

    def __init__(self, folder: str):
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "diffdis_core":
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, [self.folder])


def _install_core_finder() -> None:
    if any(getattr(finder, "tag", None) == _BundledCoreFinder.tag for finder in sys.meta_path):
        return
    # First, so the nodes get the core they were written against even if another copy is installed.
    sys.meta_path.insert(0, _BundledCoreFinder(os.path.dirname(os.path.abspath(__file__))))


def _has_v3_api() -> bool:
    try:
        import comfy_api.latest  # noqa: F401 (ComfyUI imported it already)
    except ModuleNotFoundError as missing:
        if missing.name not in ("comfy_api", "comfy_api.latest"):
            raise
        return False
    return True


_install_core_finder()

if _has_v3_api():
    from .nodes import extension

    async def comfy_entrypoint():
        """What ComfyUI calls once it has imported the pack: the extension listing the DiffDIS nodes."""
        return extension()

    __all__ = ["comfy_entrypoint"]
else:
    NODE_CLASS_MAPPINGS = {}  # ComfyUI loads the pack with no nodes, and says nothing: the line below says why
    __all__ = ["NODE_CLASS_MAPPINGS"]
    if "folder_paths" in sys.modules:  # a ComfyUI imports the pack (not, say, pytest collecting this folder)
        logging.error(f"DiffDIS needs ComfyUI {MINIMUM_COMFYUI} or newer (its V3 node API, comfy_api.latest): "
                      "update ComfyUI; the DiffDIS nodes are not loaded.")
