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
from .files import damaged_file_remedy, read_errors_named, read_json, safetensors_shapes, write_bytes_atomic
from .spec import EMPTY_EMBED_KEY

# The CLIP config values that size the text encoder's tensors, read from its weights' header instead
# (tensor name ending, axis; names are "text_model."-prefixed in most files): some copies of the released
# config say the wrong hidden_size (authors' issue #3), and no config value may size more than the file holds.
CLIP_SIZES_IN_WEIGHTS = {
    "vocab_size": ("embeddings.token_embedding.weight", 0),
    "hidden_size": ("embeddings.token_embedding.weight", 1),
    "max_position_embeddings": ("embeddings.position_embedding.weight", 0),
    "intermediate_size": ("encoder.layers.0.mlp.fc1.weight", 0),
}
CLIP_LAYER_PREFIX = "encoder.layers."
# The released tokenizer files are at most 1.1 MB (vocab.json); no tokenizer file is read past this.
MAX_TOKENIZER_FILE_BYTES = 16 << 20


def load_empty_embedding(path: str | os.PathLike) -> torch.Tensor:
    from safetensors.torch import load_file

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


def clip_sizes_in_weights(weights: Path) -> dict[str, int]:
    """The text encoder's sizes (``CLIP_SIZES_IN_WEIGHTS`` and ``num_hidden_layers``) from its header."""
    shapes = safetensors_shapes(weights)
    sizes = {}
    for key, (ending, axis) in CLIP_SIZES_IN_WEIGHTS.items():
        shape = next((shape for name, shape in shapes.items() if name.endswith(ending)), None)
        if shape is None or len(shape) != 2:
            raise DiffDISError(f"{weights} has no 2-d tensor *{ending}: it is not a CLIP text encoder; "
                               f"{damaged_file_remedy(weights)}")
        sizes[key] = shape[axis]
    sizes["num_hidden_layers"] = len({name.split(CLIP_LAYER_PREFIX)[1].split(".")[0]
                                      for name in shapes if CLIP_LAYER_PREFIX in name})
    return sizes


def check_tokenizer_files(tokenizer_dir: Path) -> None:
    with read_errors_named(tokenizer_dir):
        for path in tokenizer_dir.iterdir() if tokenizer_dir.is_dir() else []:
            if path.is_file() and path.stat().st_size > MAX_TOKENIZER_FILE_BYTES:
                raise DiffDISError(f"{path} is larger than any tokenizer file ({MAX_TOKENIZER_FILE_BYTES:,} bytes "
                                   f"at most); {damaged_file_remedy(path)}")


@torch.no_grad()
def encode_empty_prompt(text_encoder_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike) -> torch.Tensor:
    """CLIP text-encoder output for "" tokenised without padding ([1, 2, dim]: start and end tokens)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    text_encoder_dir = Path(text_encoder_dir)
    weights = text_encoder_dir / "model.safetensors"
    if not weights.is_file():
        raise DiffDISError(f"no {weights}: the text encoder is read from safetensors only "
                           f"(or put {EMPTY_EMBED_KEY}.safetensors in the model folder)")
    config_path = text_encoder_dir / "config.json"
    settings = read_json(config_path)  # bounded, and read here only: transformers gets the checked values
    sizes = clip_sizes_in_weights(weights)
    check_tokenizer_files(Path(tokenizer_dir))
    try:
        config = CLIPTextConfig.from_dict({k: v for k, v in settings.items() if not k.startswith("_")} | sizes)
    except Exception as error:  # transformers validates the architecture with several error types
        detail = (str(error.__cause__ or error).strip().splitlines() or [type(error).__name__])[0]
        raise DiffDISError(f"{config_path} does not fit the text encoder in its weights ({detail}); "
                           "is the file damaged?") from None
    try:
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
