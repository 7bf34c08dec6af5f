"""ComfyUI entry point of the DiffDIS node pack (this folder goes into ComfyUI/custom_nodes/, under any name).

ComfyUI imports this file as a package named after the folder's path, so everything inside is
imported relatively. The bundled ``diffdis_core`` package is made importable by that name without
putting this folder on ``sys.path``, where the pack's ``nodes`` package would shadow ComfyUI's own
top-level ``nodes`` module. Import is cheap: no model, no network, and the core (with diffusers) is
only imported when a node first runs.
"""

import importlib.abc
import importlib.machinery
import os
import sys


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


_install_core_finder()

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_model_folder  # noqa: E402

# Register ComfyUI/models/diffdis now, after ComfyUI has read extra_model_paths.yaml.
register_model_folder()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
