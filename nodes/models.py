"""DiffDIS model folders under ComfyUI/models/diffdis, the one-time download, and the loaded model
handed to ComfyUI's memory management."""

from __future__ import annotations

import math
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

import torch

from diffdis_core import devices, spec

from . import services
from .checks import check_choice, core, error

if TYPE_CHECKING:
    from diffdis_core import DiffDISPipeline

DOWNLOAD_REPO = spec.DEFAULT_MODEL
DOWNLOAD_FOLDER = "DiffDIS"  # where the download entry puts the model, inside the first models/diffdis folder
DOWNLOAD_ENTRY = f"{DOWNLOAD_REPO} (download on first use)"  # saved in workflows: keep it stable
# Said the same way in the tooltip, the workflows' notes, docs/comfyui.md and the README.
DOWNLOAD_SIZE = "3.65 GB UNet + 335 MB VAE, plus the 1.36 GB text encoder once, to cache the empty-prompt embedding"

UNET_WEIGHTS = spec.UNET_WEIGHTS_NAMES
EMBED_FILE = spec.EMPTY_EMBED_FILE

PRECISIONS = list(devices.DTYPE_CHOICES)
DEVICES = ["auto", "cpu"]


def tree_help(name: str) -> str:
    """What the model folder ``name`` must hold (the core's one layout table, spec.MODEL_FOLDER_LAYOUT)."""
    return f"{spec.layout_help(name + '/')} (all from huggingface.co/{DOWNLOAD_REPO})"


# ---------------------------------------------------------------------------- listing and resolving
def list_models() -> list[str]:
    """Every model folder in the models/diffdis folders (first one wins on equal names), then the
    download entry."""
    names: list[str] = []
    for root in services.model_roots():
        try:
            children = sorted(root.iterdir(), key=lambda p: p.name.lower())
        except OSError:  # missing or unreadable: listing must not break ComfyUI's node list
            continue
        for child in children:
            if child.is_dir() and not child.name.startswith(".") and child.name not in names:
                names.append(child.name)
    return names + [DOWNLOAD_ENTRY]


def check_model_name(name: str) -> None:
    """A model name from the UI or an API prompt must be one folder name: no path, no '..'."""
    if not isinstance(name, str) or not name.strip():
        raise error("no model selected: pick a model folder in Load DiffDIS")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if (len(parts) != 1 or parts[0] in (".", "..") or PurePosixPath(name).is_absolute()
            or PureWindowsPath(name).drive or PureWindowsPath(name).root):
        raise error(f"model {name!r} is not a folder name inside {services.model_roots()[0]}: "
                    "pick one of the listed models (paths and '..' are not allowed)")


def model_folder(name: str) -> Path:
    """The complete model folder for a Load DiffDIS ``model`` value; downloads for the download entry."""
    if name == DOWNLOAD_ENTRY:
        return downloaded_model()
    check_model_name(name)
    core()
    from diffdis_core.files import read_errors_named
    from diffdis_core.loading import check_model_folder  # the core says what is missing

    roots = services.model_roots()
    with read_errors_named():  # an unreadable models folder: one line naming it
        folder = next((root / name for root in roots if (root / name).is_dir()), None)
    if folder is None:
        raise error(f"model folder {roots[0] / name} does not exist: create it as "
                    f"{tree_help(name)}, or pick '{DOWNLOAD_ENTRY}'")
    return check_model_folder(folder)


def downloaded_model() -> Path:
    """models/diffdis/DiffDIS: used as is when complete (no network), else downloaded there."""
    diffdis_core = core()
    from diffdis_core import hub
    from diffdis_core.loading import missing_model_files

    roots = services.model_roots()
    for root in roots:
        if (root / DOWNLOAD_FOLDER).is_dir() and not missing_model_files(root / DOWNLOAD_FOLDER):
            return root / DOWNLOAD_FOLDER
    target = roots[0] / DOWNLOAD_FOLDER
    files = spec.MODEL_FILES + ([] if (target / EMBED_FILE).is_file() else spec.TEXT_ENCODER_FILES)
    try:
        hub.download(DOWNLOAD_REPO, files, local_dir=target)  # huggingface-hub creates the folder
    except (diffdis_core.DiffDISError, OSError) as failure:
        raise error(f"could not download {DOWNLOAD_REPO} into {target} ({_short(failure)}); download it by hand "
                    f"so that it holds {tree_help(DOWNLOAD_FOLDER)}") from failure
    missing = missing_model_files(target)
    if missing:
        raise error(f"the download of {DOWNLOAD_REPO} into {target} lacks {', '.join(missing)}; "
                    f"add them by hand: {tree_help(DOWNLOAD_FOLDER)}")
    return target


def _short(failure: Exception) -> str:
    """The cause in a few words: the error type the core names in brackets ("... (ConnectionError);
    how-to"), else the message's first clause."""
    clause = str(failure).split(";")[0].strip()
    named = re.findall(r"\((\w+)\)", clause)
    if named:
        return named[-1]
    return clause if len(clause) <= 160 else clause[:157] + "..."


# ---------------------------------------------------------------------------- the loaded model
class DiffDISModules(torch.nn.Module):
    """The pipeline's UNet and VAE as one module, the unit ComfyUI loads, offloads and unloads."""

    def __init__(self, unet: torch.nn.Module, vae: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.vae = vae

    def get_dtype(self) -> torch.dtype:  # ModelPatcher.model_dtype() asks for this
        return self.unet.dtype


class DiffDISModel:
    """What flows along a DIFFDIS_MODEL link: the core pipeline plus its ComfyUI ModelPatcher.

    Every node calls ``ready()`` before using the pipeline: ComfyUI then (re)loads the weights to the
    GPU, after freeing other models if needed, and may offload or unload them again afterwards.
    """

    def __init__(self, pipeline: DiffDISPipeline, name: str, folder: Path,
                 load_device: torch.device, offload_device: torch.device):
        self.pipeline = pipeline
        self.name = name
        self.folder = folder
        self.load_device = load_device
        self.offload_device = offload_device
        self.modules = DiffDISModules(pipeline.unet, pipeline.vae)
        self.patcher = services.model_patcher(self.modules, load_device, offload_device)

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        return self.pipeline.vae_dtype

    def ready(self, memory_required: int) -> DiffDISPipeline:
        """The pipeline on its load device, with ``memory_required`` bytes left for one chunk."""
        if self.patcher is not None:
            services.load_model(self.patcher, memory_required)
        else:
            self.pipeline.to(self.load_device)
        return self.pipeline  # its empty-prompt embedding follows the UNet at each call

    def __repr__(self) -> str:
        return f"DiffDISModel({self.name!r}, {self.load_device}, {self.dtype})"


def unet_parameter_count(folder: Path) -> int:
    """The UNet's parameter count, read from its safetensors header (no weights loaded): ComfyUI's
    precision heuristics weigh it against the free memory. A truncated or unreadable file is the core's
    one line naming it."""
    core()
    from diffdis_core.files import find_weights, safetensors_shapes

    weights = find_weights(folder / "unet", UNET_WEIGHTS)
    if weights is None:
        raise error(f"{folder / 'unet'} has no {UNET_WEIGHTS[0]}; a complete folder holds {tree_help(folder.name)}")
    return sum(math.prod(shape) for shape in safetensors_shapes(weights).values())


def set_memory_format(pipeline: DiffDISPipeline, device: torch.device) -> None:
    """Choose the layout for the device the model will run on, not the one it is loaded on: ComfyUI
    moves the modules there later and keeps their layout. Channels-last except on Apple MPS, the
    core's rule (DiffDISPipeline.to)."""
    pipeline.set_channels_last(devices.channels_last_on(device))


def load(name: str, precision: str, device: str, compile: bool = False) -> DiffDISModel:
    """Resolve (or download) the model folder and load it on the offload device; never touches the
    network for a folder that is already complete. ``compile``: torch.compile the UNet and VAE."""
    check_choice("precision", precision, PRECISIONS)
    check_choice("device", device, DEVICES)
    folder = model_folder(name)
    load_device, offload_device = services.choose_devices(device)
    if compile:
        devices.check_compiler(load_device, turn_off="turn compile off in Load DiffDIS")
    dtype = services.choose_dtype(precision, load_device, unet_parameter_count(folder))
    # base=None: everything comes from the folder, so nothing is fetched from the Hub.
    pipeline = core().DiffDISPipeline.from_pretrained(folder, base=None, torch_dtype=dtype, device=offload_device)
    set_memory_format(pipeline, load_device)
    if compile:
        pipeline.compile()
    return DiffDISModel(pipeline, name, folder, load_device, offload_device)
