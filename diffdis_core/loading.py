"""Finding a pipeline's parts in the forms users have them, and checking them before they load.

- a complete model folder or Hugging Face repo (unet/, vae/, scheduler/, text_encoder/, tokenizer/);
- the authors' Google-Drive ``unet/`` folder plus an SD-Turbo folder or repo (``base``);
- a single UNet ``.safetensors`` file (also the fp16 repack with its embedding) plus ``base``.
Missing parts are taken from the model first, then from ``base``; a repo is only downloaded for
the parts that are needed, and never when the files are on disk.

Every part is checked against its config before it loads (from the files' headers, no weights read):
a truncated, damaged or inconsistent file is one DiffDISError naming the file and what is wrong,
never a traceback from deep inside diffusers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .configs import SD_TURBO_UNET_CONFIG
from .errors import DiffDISError
from .hub import (
    DEFAULT_BASE,
    EMPTY_EMBED_FILE,
    LAYOUT_HELP,
    download,
    is_repo_id,
    local_path,
    option,
    resolve_unet_files,
)
from .spec import MODEL_FILES, TEXT_ENCODER_FILES, UNET_WEIGHTS_NAMES
from .text import check_embedding_width, encode_empty_prompt, load_empty_embedding, save_empty_embedding

# A model repo may also hold the cached embedding (save_pretrained writes it); ask for it, never require it.
MODEL_REPO_FILES = [*MODEL_FILES, EMPTY_EMBED_FILE]
# Legacy attention names some older VAE files use; diffusers renames them when loading.
LEGACY_ATTENTION_NAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


# ---------------------------------------------------------------------------------------------- file checks
def damaged_file_remedy(path: str | os.PathLike) -> str:
    """What to do with a damaged file: a Hugging Face cache file is fetched again once deleted; a
    local one (a copy, a training checkpoint) must be replaced."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        in_cache = os.path.abspath(path).startswith(os.path.abspath(HF_HUB_CACHE) + os.sep)
    except ImportError:
        in_cache = False
    if in_cache:
        return "delete it from the Hugging Face cache and run again to download it anew"
    return "replace it with a complete copy"


def _describe_bad_safetensors(path: Path, error: Exception) -> str:
    """Why ``path`` is not a readable safetensors file, in words (truncated, not safetensors, ...)."""
    size = path.stat().st_size
    if size == 0:
        return "is empty"
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if header_len < 2 or header_len > min(size - 8, 100_000_000):
            kind = "a pickle/zip archive" if head[:2] == b"PK" or head[:1] == b"\x80" else "something else"
            return f"is not a safetensors file (it looks like {kind})" if size > 8 else f"is truncated ({size} bytes)"
        try:
            header = json.loads(f.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError):
            return "has a damaged header (not valid safetensors JSON)"
    expected = 8 + header_len + end
    if size < expected:
        return f"is truncated: {size:,} of {expected:,} bytes (an interrupted write or copy?)"
    if size > expected:
        return f"has {size - expected:,} bytes more than its header describes"
    return f"is damaged ({str(error).splitlines()[0]})"


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header (no data read), checking the file is whole."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises several types for truncated or foreign files
        raise DiffDISError(f"{path} {_describe_bad_safetensors(path, error)}; {damaged_file_remedy(path)}") from None


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object file; a DiffDISError naming the file and the line when it is not one."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise DiffDISError(f"{path} is not valid JSON (line {error.lineno}: {error.msg}); "
                           f"{damaged_file_remedy(path)}") from None
    except UnicodeDecodeError:
        raise DiffDISError(f"{path} is not a text file; {damaged_file_remedy(path)}") from None
    except OSError as error:
        raise DiffDISError(f"{path}: cannot read it ({error.strerror})") from None
    if not isinstance(data, dict):
        raise DiffDISError(f"{path} holds a JSON {type(data).__name__}, not a config object; "
                           f"{damaged_file_remedy(path)}")
    return data


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


def check_vae_folder(folder: Path) -> None:
    """config.json and the weights of a VAE folder agree (what AutoencoderKL.from_pretrained needs)."""
    from diffusers import AutoencoderKL

    config = read_json(_required_file(folder, "config.json", "vae"))
    weights = next((folder / n for n in UNET_WEIGHTS_NAMES if (folder / n).is_file()), None)
    if weights is None:
        pickled = sorted(p.name for p in folder.glob("*") if p.suffix in {".bin", ".ckpt", ".pt", ".pth"})
        if pickled:
            raise DiffDISError(f"{folder} has only {pickled[0]}: DiffDIS loads .safetensors weights only "
                               "(pickled files can run code); convert it or download the safetensors version")
        _required_file(folder, UNET_WEIGHTS_NAMES[0], "vae")
    try:
        with torch.device("meta"):
            vae = AutoencoderKL.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    except Exception as error:  # diffusers raises several types for impossible configs
        raise DiffDISError(f"{folder / 'config.json'} does not describe a VAE ({type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else ''})") from None
    check_weights(weights, {k: tuple(v.shape) for k, v in vae.state_dict().items()}, "VAE")


def _required_file(folder: Path, name: str, part: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise DiffDISError(f"{folder} has no {name}: a {part}/ folder needs config.json and "
                           f"{'diffusion_pytorch_model.safetensors' if part in ('vae', 'unet') else 'its files'}")
    return path


def check_scheduler_folder(folder: Path) -> None:
    config = folder / "scheduler_config.json"
    if config.is_file():
        read_json(config)


PART_CHECKS = {"vae": check_vae_folder, "scheduler": check_scheduler_folder}


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

    def unet_config(self) -> dict[str, Any]:
        """The weights' own config.json, else the base's, else SD-Turbo's (what the release used)."""
        for candidate in (self.unet_weights.with_name("config.json"), self._local_base_file("unet/config.json")):
            if candidate is not None and candidate.is_file():
                return read_json(candidate)
        return SD_TURBO_UNET_CONFIG

    def _local_base_file(self, relative: str) -> Path | None:
        if self.base is None or is_repo_id(self.base):
            return None
        return Path(self.base) / relative

    def component(self, name: str, required: bool = True) -> Path | None:
        """The folder of ``name`` (vae, scheduler, text_encoder, tokenizer): model, then base.

        The VAE and scheduler folders are checked (configs readable, weights whole and matching).
        """
        folder = self._find_component(name, required)
        if folder is not None and name in PART_CHECKS:
            PART_CHECKS[name](folder)
        return folder

    def _find_component(self, name: str, required: bool) -> Path | None:
        if self.model_dir is not None and (self.model_dir / name).is_dir():
            return self.model_dir / name
        if self.model_repo is not None:
            folder = download(self.model_repo, [f"{name}/*"], local_dir=self.local_dir, role="model",
                              **self.hub_kwargs) / name
            if folder.is_dir():
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
        if not (base / name).is_dir():
            if required:
                raise DiffDISError(f"no {name}/ in {where} nor in the base {base}; {LAYOUT_HELP}")
            return None
        return base / name

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
            save_empty_embedding(embed, target / EMPTY_EMBED_FILE)
        return embed
