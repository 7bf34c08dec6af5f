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

TREE_HELP = ("<name>/unet/{config.json, diffusion_pytorch_model.safetensors}, "
             "<name>/vae/{config.json, diffusion_pytorch_model.safetensors}, <name>/scheduler/scheduler_config.json "
             f"(optional), and <name>/{EMBED_FILE} or <name>/text_encoder/model.safetensors + <name>/tokenizer/ "
             f"(all from huggingface.co/{DOWNLOAD_REPO})")


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


def missing_files(folder: Path) -> list[str]:
    """The files of the released layout that ``folder`` lacks (empty when it is complete)."""
    missing = []
    if not any((folder / "unet" / name).is_file() for name in UNET_WEIGHTS):
        missing.append(f"unet/{UNET_WEIGHTS[0]}")
    for name in ("vae/config.json", f"vae/{UNET_WEIGHTS[0]}"):
        if not (folder / name).is_file():
            missing.append(name)
    has_encoder = (folder / "text_encoder" / "model.safetensors").is_file() and (folder / "tokenizer").is_dir()
    if not (folder / EMBED_FILE).is_file() and not has_encoder:
        missing.append(f"{EMBED_FILE} (or text_encoder/model.safetensors + tokenizer/)")
    return missing


def model_folder(name: str) -> Path:
    """The complete model folder for a Load DiffDIS ``model`` value; downloads for the download entry."""
    if name == DOWNLOAD_ENTRY:
        return downloaded_model()
    check_model_name(name)
    roots = services.model_roots()
    folder = next((root / name for root in roots if (root / name).is_dir()), None)
    if folder is None:
        raise error(f"model folder {roots[0] / name} does not exist: create it as "
                    f"{TREE_HELP.replace('<name>', name)}, or pick '{DOWNLOAD_ENTRY}'")
    missing = missing_files(folder)
    if missing:
        raise error(f"model folder {folder} is incomplete, missing {', '.join(missing)}; "
                    f"a complete folder holds {TREE_HELP.replace('<name>', name)}")
    return folder


def downloaded_model() -> Path:
    """models/diffdis/DiffDIS: used as is when complete (no network), else downloaded there."""
    roots = services.model_roots()
    for root in roots:
        if (root / DOWNLOAD_FOLDER).is_dir() and not missing_files(root / DOWNLOAD_FOLDER):
            return root / DOWNLOAD_FOLDER
    target = roots[0] / DOWNLOAD_FOLDER
    files = spec.MODEL_FILES + ([] if (target / EMBED_FILE).is_file() else spec.TEXT_ENCODER_FILES)
    diffdis_core = core()
    from diffdis_core import hub

    try:
        hub.download(DOWNLOAD_REPO, files, local_dir=target)  # huggingface-hub creates the folder
    except (diffdis_core.DiffDISError, OSError) as failure:
        raise error(f"could not download {DOWNLOAD_REPO} into {target} ({_short(failure)}); download it by hand "
                    f"so that it holds {TREE_HELP.replace('<name>', DOWNLOAD_FOLDER)}") from failure
    missing = missing_files(target)
    if missing:
        raise error(f"the download of {DOWNLOAD_REPO} into {target} lacks {', '.join(missing)}; "
                    f"add them by hand: {TREE_HELP.replace('<name>', DOWNLOAD_FOLDER)}")
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
    precision heuristics weigh it against the free memory."""
    from safetensors import safe_open

    weights = next(folder / "unet" / name for name in UNET_WEIGHTS if (folder / "unet" / name).is_file())
    with safe_open(str(weights), framework="pt") as tensors:
        return sum(math.prod(tensors.get_slice(key).get_shape()) for key in tensors.keys())


def set_memory_format(pipeline: DiffDISPipeline, device: torch.device) -> None:
    """Choose the layout for the device the model will run on, not the one it is loaded on: ComfyUI
    moves the modules there later and keeps their layout. Channels-last except on Apple MPS, the
    core's rule (DiffDISPipeline.to)."""
    pipeline.set_channels_last(device.type in ("cpu", "cuda"))


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
