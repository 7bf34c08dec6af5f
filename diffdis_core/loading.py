"""Finding a pipeline's parts in the forms users have them.

- a complete model folder or Hugging Face repo (unet/, vae/, scheduler/, text_encoder/, tokenizer/);
- the authors' Google-Drive ``unet/`` folder plus an SD-Turbo folder or repo (``base``);
- a single UNet ``.safetensors`` file (also the fp16 repack with its embedding) plus ``base``.
Missing parts are taken from the model first, then from ``base``; a repo is only downloaded for
the parts that are needed, and never when the files are on disk.
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
from .hub import DEFAULT_BASE, EMPTY_EMBED_FILE, LAYOUT_HELP, download, is_repo_id, resolve_unet_files
from .text import encode_empty_prompt, load_empty_embedding, save_empty_embedding

MODEL_REPO_FILES = ["unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                    "vae/diffusion_pytorch_model.safetensors", "scheduler/*", EMPTY_EMBED_FILE]


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
            model = download(model_repo, MODEL_REPO_FILES, local_dir=local_dir, **hub_kwargs)
        path = Path(model)
        _, weights = resolve_unet_files(path, "unet")
        model_dir = path if path.is_dir() and weights.parent != path else None
        return cls(weights, model_dir, model_repo, os.fspath(base) if base is not None else None,
                   hub_kwargs, local_dir)

    def unet_config(self) -> dict[str, Any]:
        """The weights' own config.json, else the base's, else SD-Turbo's (what the release used)."""
        for candidate in (self.unet_weights.with_name("config.json"), self._local_base_file("unet/config.json")):
            if candidate is not None and candidate.is_file():
                with open(candidate, encoding="utf-8") as f:
                    return json.load(f)
        return SD_TURBO_UNET_CONFIG

    def _local_base_file(self, relative: str) -> Path | None:
        if self.base is None or is_repo_id(self.base):
            return None
        return Path(self.base) / relative

    def component(self, name: str, required: bool = True) -> Path | None:
        """The folder of ``name`` (vae, scheduler, text_encoder, tokenizer): model, then base."""
        if self.model_dir is not None and (self.model_dir / name).is_dir():
            return self.model_dir / name
        if self.model_repo is not None:
            folder = download(self.model_repo, [f"{name}/*"], local_dir=self.local_dir, **self.hub_kwargs) / name
            if folder.is_dir():
                return folder
        if self.base is None:
            if required:
                raise DiffDISError(f"{self.model_dir or self.unet_weights} has no {name}/ and no base model was given: "
                                   f"pass the SD-Turbo folder or repo id {DEFAULT_BASE!r} as base")
            return None
        if not required and is_repo_id(self.base):
            return None  # optional parts (the scheduler) have built-in defaults: no download for them
        base = download(self.base, [f"{name}/*"], **self.hub_kwargs) if is_repo_id(self.base) else Path(self.base)
        if not base.is_dir():
            raise DiffDISError(f"base model folder {base} does not exist; {LAYOUT_HELP}")
        if not (base / name).is_dir():
            if required:
                raise DiffDISError(f"no {name}/ in {self.model_dir or self.unet_weights} nor in the base {base}; "
                                   f"{LAYOUT_HELP}")
            return None
        return base / name

    def empty_embedding(self, cache: bool) -> torch.Tensor:
        """Read ``empty_text_embed.safetensors``, or encode the empty prompt once and cache it."""
        candidates = [self.model_dir / EMPTY_EMBED_FILE if self.model_dir else None,
                      self.unet_weights.parent / EMPTY_EMBED_FILE,
                      self._local_base_file(EMPTY_EMBED_FILE)]
        for candidate in candidates:
            if candidate is not None and candidate.is_file():
                return load_empty_embedding(candidate)
        embed = encode_empty_prompt(self.component("text_encoder"), self.component("tokenizer"))
        target = self.model_dir or self.unet_weights.parent
        if cache and os.access(target, os.W_OK):
            save_empty_embedding(embed, target / EMPTY_EMBED_FILE)
        return embed
