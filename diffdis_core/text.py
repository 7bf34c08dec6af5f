"""The empty-prompt embedding: the only thing DiffDIS needs from the text encoder.

It is computed once (the text encoder is loaded, run on the unpadded empty prompt and dropped) and
cached as ``empty_text_embed.safetensors``, so later loads never touch the 1.4 GB text encoder.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save

from .errors import DiffDISError
from .files import write_bytes_atomic
from .spec import EMPTY_EMBED_KEY

TOKEN_EMBEDDING_KEY = "embeddings.token_embedding.weight"  # "text_model."-prefixed in most files


def load_empty_embedding(path: str | os.PathLike) -> torch.Tensor:
    from safetensors.torch import load_file

    from .loading import safetensors_shapes

    shapes = safetensors_shapes(path)  # a damaged file: one line saying how
    shape = shapes.get(EMPTY_EMBED_KEY)
    if shape is None or len(shape) != 3:
        raise DiffDISError(f"{path} has no [1, tokens, width] tensor '{EMPTY_EMBED_KEY}'; delete it to re-encode it")
    return load_file(os.fspath(path))[EMPTY_EMBED_KEY].float()


def check_embedding_width(embed: torch.Tensor, width: object, source: str | os.PathLike) -> torch.Tensor:
    """``embed`` if its width is the UNet's ``cross_attention_dim`` (``width``), else a DiffDISError."""
    if isinstance(width, int) and embed.shape[-1] != width:
        fix = "delete it to re-encode it" if str(source).endswith(".safetensors") else "use the text encoder of " \
            "the UNet's base model"
        raise DiffDISError(f"{source}: the empty-prompt embedding is {embed.shape[-1]} wide, but the UNet's "
                           f"cross_attention_dim is {width} (they come from different models); {fix}")
    return embed


def save_empty_embedding(embed: torch.Tensor, path: str | os.PathLike) -> None:
    """Write atomically (``files.write_bytes_atomic``), readable as the umask says (safetensors' own
    ``save_file`` would leave it 0600)."""
    write_bytes_atomic(path, save({EMPTY_EMBED_KEY: embed.detach().float().cpu().contiguous()}))


@torch.no_grad()
def encode_empty_prompt(text_encoder_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike) -> torch.Tensor:
    """CLIP text-encoder output for "" tokenised without padding ([1, 2, dim]: start and end tokens)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .loading import read_json, safetensors_shapes

    text_encoder_dir = Path(text_encoder_dir)
    weights = text_encoder_dir / "model.safetensors"
    if not weights.is_file():
        raise DiffDISError(f"no {weights}: the text encoder is read from safetensors only "
                           f"(or put {EMPTY_EMBED_KEY}.safetensors in the model folder)")
    read_json(text_encoder_dir / "config.json")
    shapes = safetensors_shapes(weights)
    try:
        config = CLIPTextConfig.from_pretrained(text_encoder_dir)
        # Some copies of the released config say the wrong hidden_size (authors' issue #3): trust the weights.
        for key, shape in shapes.items():
            if key.endswith(TOKEN_EMBEDDING_KEY):
                config.hidden_size = shape[1]
        encoder = CLIPTextModel.from_pretrained(text_encoder_dir, config=config, use_safetensors=True).eval()
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise DiffDISError(f"could not load the text encoder in {text_encoder_dir} "
                           f"({str(error).strip().splitlines()[0]})") from None
    try:
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError, TypeError) as error:
        raise DiffDISError(f"could not load the tokenizer in {tokenizer_dir} "
                           f"({str(error).strip().splitlines()[0]}); it needs vocab.json and merges.txt") from None
    ids = tokenizer("", padding="do_not_pad", return_tensors="pt").input_ids
    return encoder(ids)[0].float()
