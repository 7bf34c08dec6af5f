"""Finding a pipeline's parts in the forms users have them, and checking them before they load.

- a complete model folder or Hugging Face repo (unet/, vae/, scheduler/, text_encoder/, tokenizer/);
- the authors' Google-Drive ``unet/`` folder plus an SD-Turbo folder or repo (``base``);
- a single UNet ``.safetensors`` file (also the fp16 repack with its embedding) plus ``base``.
Missing parts are taken from the model first, then from ``base``; a repo is only downloaded for
the parts that are needed, and never when the files are on disk.

Every part is checked before it loads: its config's values within bounds (configs.*_CONFIG_RULES),
then the architecture against the files' headers (no weights read). A truncated, damaged, unreadable or
inconsistent file is one DiffDISError naming the file and what to do, never a traceback from deep
inside diffusers. ``load_vae`` and ``load_scheduler`` are the loaders of the pipeline and of training.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .configs import (
    SCHEDULER_CONFIG_RULES,
    SD_TURBO_SCHEDULER_CONFIG,
    SD_TURBO_UNET_CONFIG,
    UNET_CONFIG_RULES,
    VAE_CONFIG_RULES,
    check_config,
)
from .devices import vae_dtype, vae_force_upcast
from .errors import DiffDISError
from .files import damaged_file_remedy, find_weights, read_errors_named, read_json, read_safetensors, safetensors_shapes
from .hub import LAYOUT_HELP, download, is_repo_id, local_path, option, resolve_unet_files
from .spec import (
    BUILT_IN_FILES,
    DEFAULT_BASE,
    EMPTY_EMBED_FILE,
    MODEL_FILES,
    MODEL_FOLDER_LAYOUT,
    TEXT_ENCODER_FILES,
    TEXT_ENCODER_PARTS,
    UNET_WEIGHTS_NAMES,
    layout_help,
    part_help,
)
from .text import check_embedding_width, encode_empty_prompt, load_empty_embedding, save_empty_embedding

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler

# A model repo may also hold the cached embedding (save_pretrained writes it); ask for it, never require it.
MODEL_REPO_FILES = [*MODEL_FILES, EMPTY_EMBED_FILE]
# Legacy attention names some older VAE files use; diffusers renames them when loading.
LEGACY_ATTENTION_NAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


# ---------------------------------------------------------------------------------------------- model folders
def missing_model_files(folder: str | os.PathLike) -> list[str]:
    """The files of the layout (spec.MODEL_FOLDER_LAYOUT) that ``folder`` lacks to load on its own
    (no base): empty when it is complete. Built-in files (spec.BUILT_IN_FILES) are never missing."""
    folder = Path(folder)

    def has(part: str, name: str) -> bool:
        names = UNET_WEIGHTS_NAMES if name == UNET_WEIGHTS_NAMES[0] else (name,)  # the fp16 file will do too
        return f"{part}/{name}" in BUILT_IN_FILES or any((folder / part / n).is_file() for n in names)

    with read_errors_named(folder):
        missing = [f"{part}/{name}" for part in ("unet", "vae") for name in MODEL_FOLDER_LAYOUT[part]
                   if not has(part, name)]
        if not (folder / EMPTY_EMBED_FILE).is_file() and not all(
                has(part, name) for part in TEXT_ENCODER_PARTS for name in MODEL_FOLDER_LAYOUT[part]):
            missing.append(f"{EMPTY_EMBED_FILE} (or {' + '.join(part_help(p) for p in TEXT_ENCODER_PARTS)})")
    return missing


def check_model_folder(folder: str | os.PathLike) -> Path:
    """``folder`` if it holds a complete model (see ``missing_model_files``), else one DiffDISError
    listing what it lacks and what a complete folder holds."""
    folder = Path(folder)
    missing = missing_model_files(folder)
    if missing:
        raise DiffDISError(f"model folder {folder} is incomplete, missing {', '.join(missing)}; "
                           f"a complete folder holds {layout_help(folder.name + '/')}")
    return folder


def _required_file(folder: Path, name: str, part: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise DiffDISError(f"{folder} has no {name}: a {part}/ folder holds {part_help(part)}")
    return path


# ---------------------------------------------------------------------------------------------- parts
def read_unet_config(path: str | os.PathLike) -> dict[str, Any]:
    """A UNet config.json, its layer counts and widths within bounds (configs.UNET_CONFIG_RULES)."""
    return check_config(read_json(path), UNET_CONFIG_RULES, path)


def check_weights(weights: Path, expected: dict[str, tuple[int, ...]], what: str) -> None:
    """Every tensor ``expected`` (name -> shape) is in ``weights`` with that shape."""
    found = safetensors_shapes(weights)
    for legacy, name in LEGACY_ATTENTION_NAMES.items():
        found.update({k.replace(legacy, name): v for k, v in list(found.items()) if legacy in k})
    missing = sorted(set(expected) - set(found))
    if missing:
        raise DiffDISError(f"{weights} lacks {len(missing)} tensor(s) the {what} needs, e.g. {missing[0]}: "
                           f"the file is incomplete or belongs to another model; {damaged_file_remedy(weights)}")
    wrong = [k for k in expected if tuple(found[k]) != tuple(expected[k])]
    if wrong:
        k = wrong[0]
        raise DiffDISError(f"{weights}: {len(wrong)} tensor(s) do not fit its config.json, e.g. {k} is "
                           f"{list(found[k])}, the config needs {list(expected[k])}")


def _current_name(key: str) -> str:
    for legacy, name in LEGACY_ATTENTION_NAMES.items():
        key = key.replace(legacy, name)
    return key


def load_vae(folder: str | os.PathLike, torch_dtype: torch.dtype = torch.float32,
             memory_format: torch.memory_format | None = None) -> AutoencoderKL:
    """The VAE in ``folder`` (config.json + diffusion_pytorch_model.safetensors), on the CPU.

    Checked before any tensor is allocated: the config within bounds (configs.VAE_CONFIG_RULES), the
    architecture built on the meta device, every shape it needs in the weights' header. Loaded one
    tensor at a time straight into its dtype: ``torch_dtype``, or float32 under float16 where the config
    asks (``devices.vae_force_upcast``: the SD VAE overflows in float16); 4-D tensors in ``memory_format``.
    """
    from diffusers import AutoencoderKL

    folder = Path(folder)
    with read_errors_named(folder):
        config_path = _required_file(folder, "config.json", "vae")
        config = check_config(read_json(config_path), VAE_CONFIG_RULES, config_path)
        weights = find_weights(folder, UNET_WEIGHTS_NAMES) or _required_file(folder, UNET_WEIGHTS_NAMES[0], "vae")
        try:
            with torch.device("meta"):
                vae = AutoencoderKL.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        except Exception as error:  # diffusers raises several types for impossible configs
            raise DiffDISError(f"{config_path} does not describe a VAE ({type(error).__name__}: "
                               f"{str(error).splitlines()[0] if str(error) else ''})") from None
        expected = vae.state_dict()
        check_weights(weights, {k: tuple(v.shape) for k, v in expected.items()}, "VAE")
        dtype = vae_dtype(torch_dtype, vae_force_upcast(vae.config))
        # Tensors the architecture does not use are left unread.
        state = read_safetensors(weights, dtype, memory_format=memory_format,
                                 include=lambda key: _current_name(key) in expected)
        state = {_current_name(key): tensor for key, tensor in state.items()}
    vae.load_state_dict(state, strict=True, assign=True)
    return vae.eval()


def load_scheduler(folder: str | os.PathLike | None) -> DDPMScheduler:
    """The noise schedule: ``folder``'s scheduler_config.json, its values within bounds
    (configs.SCHEDULER_CONFIG_RULES), else SD-Turbo's, built in. Only the schedule is used, always with
    the epsilon parameterisation: DiffDIS predicts noise whatever its base did (SD 2.1: v)."""
    from diffusers import DDPMScheduler

    config_path = None if folder is None else Path(folder) / MODEL_FOLDER_LAYOUT["scheduler"][0]
    with read_errors_named(folder):
        if config_path is None or not config_path.is_file():
            config, config_path = SD_TURBO_SCHEDULER_CONFIG, "the built-in SD-Turbo schedule"
        else:
            config = check_config(read_json(config_path), SCHEDULER_CONFIG_RULES, config_path)
    steps = config.get("num_train_timesteps") or 1000  # DDPMScheduler's default
    betas = config.get("trained_betas")
    if betas is not None and len(betas) != steps:
        raise DiffDISError(f"{config_path}: trained_betas has {len(betas)} values for {steps} num_train_timesteps; "
                           "is the file damaged?")
    scheduler = DDPMScheduler.from_config({**config, "prediction_type": "epsilon"})
    last = float(scheduler.alphas_cumprod[-1])
    if not 0.0 < last <= 1.0:  # the one-step prediction divides by its square root
        raise DiffDISError(f"{config_path}: its schedule leaves no signal at the last timestep (alpha {last:g}); "
                           "is the file damaged or from another kind of model?")
    return scheduler


# ---------------------------------------------------------------------------------------------- sources
@dataclass
class ModelSources:
    unet_weights: Path
    model_dir: Path | None  # the folder holding unet/, vae/... (None for a single file or a bare unet/)
    model_repo: str | None  # the Hugging Face repo the model folder came from, for parts fetched later
    base: str | None
    hub_kwargs: dict[str, Any] = field(default_factory=dict)
    local_dir: str | os.PathLike | None = None

    @classmethod
    @read_errors_named()
    def resolve(cls, model: str | os.PathLike, base: str | os.PathLike | None,
                local_dir: str | os.PathLike | None = None, **hub_kwargs: Any) -> ModelSources:
        model_repo = None
        if is_repo_id(model):
            model_repo = os.fspath(model)
            model = download(model_repo, MODEL_REPO_FILES, local_dir=local_dir, role="model",
                             needed=MODEL_FILES + TEXT_ENCODER_FILES, **hub_kwargs)
        path = local_path(model, "model")
        _, weights = resolve_unet_files(path, "unet")
        model_dir = path if path.is_dir() and weights.parent != path else None
        if base is not None and not is_repo_id(base):
            base = local_path(base, "base")
        return cls(weights, model_dir, model_repo, os.fspath(base) if base is not None else None,
                   hub_kwargs, local_dir)

    @read_errors_named()
    def unet_config(self) -> dict[str, Any]:
        """The weights' own config.json, else the base's, else SD-Turbo's (what the release used); within
        bounds (``read_unet_config``)."""
        for candidate in (self.unet_weights.with_name("config.json"), self._local_base_file("unet/config.json")):
            if candidate is not None and candidate.is_file():
                return read_unet_config(candidate)
        return SD_TURBO_UNET_CONFIG

    def _local_base_file(self, relative: str) -> Path | None:
        if self.base is None or is_repo_id(self.base):
            return None
        return Path(self.base) / relative

    @read_errors_named()
    def component(self, name: str, required: bool = True) -> Path | None:
        """The folder of ``name`` (vae, scheduler, text_encoder, tokenizer): model, then base. An optional
        part's folder without its file (an empty scheduler/ an interrupted download left) is passed over.
        ``load_vae`` and ``load_scheduler`` check what they load."""

        def found(folder: Path) -> bool:
            return (folder / MODEL_FOLDER_LAYOUT[name][0]).is_file() if not required else folder.is_dir()

        if self.model_dir is not None and found(self.model_dir / name):
            return self.model_dir / name
        if self.model_repo is not None:
            folder = download(self.model_repo, [f"{name}/*"], local_dir=self.local_dir, role="model",
                              **self.hub_kwargs) / name
            if found(folder):
                return folder
        where = self.model_dir or self.unet_weights
        if self.base is None:
            if required:
                raise DiffDISError(f"{where} has no {name}/ and no base model was given: pass the SD-Turbo folder "
                                   f"or repo id {DEFAULT_BASE!r} as {option('base').rstrip(' =')}")
            return None
        if not required and is_repo_id(self.base):
            return None  # optional parts (the scheduler) have built-in defaults: no download for them
        if is_repo_id(self.base):
            base = download(self.base, [f"{name}/*"], role="base", **self.hub_kwargs)
        else:
            base = local_path(self.base, "base")
        if not found(base / name):
            if required:
                raise DiffDISError(f"no {name}/ in {where} nor in the base {base}; {LAYOUT_HELP}")
            return None
        return base / name

    @read_errors_named()
    def empty_embedding(self, cache: bool) -> torch.Tensor:
        """Read ``empty_text_embed.safetensors``, or encode the empty prompt once and cache it; its
        width must be the UNet's cross-attention width."""
        width = self.unet_config().get("cross_attention_dim")
        candidates = [self.model_dir / EMPTY_EMBED_FILE if self.model_dir else None,
                      self.unet_weights.parent / EMPTY_EMBED_FILE,
                      self._local_base_file(EMPTY_EMBED_FILE)]
        for candidate in candidates:
            if candidate is not None and candidate.is_file():
                return check_embedding_width(load_empty_embedding(candidate), width, candidate)
        text_encoder = self.component("text_encoder")
        embed = encode_empty_prompt(text_encoder, self.component("tokenizer"))
        check_embedding_width(embed, width, text_encoder)
        target = self.model_dir or self.unet_weights.parent
        if cache and os.access(target, os.W_OK):
            with contextlib.suppress(OSError):  # a cache: a full disk only means encoding again next time
                save_empty_embedding(embed, target / EMPTY_EMBED_FILE)
        return embed
