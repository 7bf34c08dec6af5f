"""The empty-prompt embedding: the only thing DiffDIS needs from the text encoder.

It is computed once (the text encoder is loaded, run on the unpadded empty prompt and dropped) and
cached as ``empty_text_embed.safetensors``, so later loads never touch the 1.4 GB text encoder.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import DiffDISError
from .spec import EMPTY_EMBED_KEY

TOKEN_EMBEDDING_KEY = "embeddings.token_embedding.weight"  # "text_model."-prefixed in most files


def load_empty_embedding(path: str | os.PathLike) -> torch.Tensor:
    try:
        tensors = load_file(os.fspath(path))
    except Exception as error:
        raise DiffDISError(f"{path} is not a readable safetensors file ({error}); delete it to re-encode") from None
    embed = tensors.get(EMPTY_EMBED_KEY)
    if embed is None or embed.ndim != 3:
        raise DiffDISError(f"{path} has no [1, tokens, dim] tensor '{EMPTY_EMBED_KEY}'; delete it to re-encode")
    return embed.float()


def save_empty_embedding(embed: torch.Tensor, path: str | os.PathLike) -> None:
    """Write atomically: a crash mid-write never leaves a truncated cache file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({EMPTY_EMBED_KEY: embed.detach().float().cpu().contiguous()}, os.fspath(tmp))
    os.replace(tmp, path)


@torch.no_grad()
def encode_empty_prompt(text_encoder_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike) -> torch.Tensor:
    """CLIP text-encoder output for "" tokenised without padding ([1, 2, dim]: start and end tokens)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    text_encoder_dir = Path(text_encoder_dir)
    weights = text_encoder_dir / "model.safetensors"
    if not weights.is_file():
        raise DiffDISError(f"no {weights}: the text encoder is read from safetensors only "
                           f"(or put {EMPTY_EMBED_KEY}.safetensors in the model folder)")
    config = CLIPTextConfig.from_pretrained(text_encoder_dir)
    # Some copies of the released config say the wrong hidden_size (authors' issue #3): trust the weights.
    with safe_open(os.fspath(weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if key.endswith(TOKEN_EMBEDDING_KEY):
                config.hidden_size = f.get_slice(key).get_shape()[1]
    encoder = CLIPTextModel.from_pretrained(text_encoder_dir, config=config, use_safetensors=True).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer("", padding="do_not_pad", return_tensors="pt").input_ids
    return encoder(ids)[0].float()
