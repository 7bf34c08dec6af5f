"""Loading the forms users have: model folders, the Google-Drive unet/ + SD-Turbo, single files, hub repos."""

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffdis_core import DiffDISError, DiffDISPipeline
from diffdis_core.spec import EMPTY_EMBED_FILE
from diffdis_core.text import encode_empty_prompt

RES = 64


def make_text_encoder(folder, hidden_size=32, config_hidden_size=None):
    """A tiny CLIP text encoder + tokenizer in diffusers layout (text_encoder/, tokenizer/)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    config = CLIPTextConfig(vocab_size=8, hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(folder / "text_encoder", safe_serialization=True)
    if config_hidden_size is not None:  # a config that disagrees with its weights (authors' issue #3)
        path = folder / "text_encoder" / "config.json"
        data = json.loads(path.read_text())
        data["hidden_size"] = config_hidden_size
        path.write_text(json.dumps(data))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder / "tokenizer")


@pytest.fixture
def sd_turbo_base(tmp_path, official_tiny):
    """An SD-Turbo-like base folder: vae/, scheduler/, text_encoder/, tokenizer/ (no DiffDIS UNet)."""
    base = tmp_path / "sd-turbo"
    base.mkdir()
    for part in ("vae", "scheduler"):
        shutil.copytree(official_tiny / part, base / part)
    make_text_encoder(base)
    return base


def run(pipe, seed=0):
    image = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(seed))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    return pipe(image, processing_res=RES, latents=noise, minmax=False).mask


def test_google_drive_unet_folder_with_sd_turbo_base(tmp_path, official_tiny, sd_turbo_base):
    unet_dir = tmp_path / "downloads" / "unet"
    shutil.copytree(official_tiny / "unet", unet_dir)
    pipe = DiffDISPipeline.from_pretrained(unet_dir, base=sd_turbo_base)
    expected = encode_empty_prompt(sd_turbo_base / "text_encoder", sd_turbo_base / "tokenizer")
    assert expected.shape == (1, 2, 32)  # unpadded empty prompt: start and end tokens only
    assert torch.allclose(pipe.empty_text_embed, expected)
    # Cached beside the weights: the text encoder is not needed again.
    assert (unet_dir / EMPTY_EMBED_FILE).is_file()
    shutil.rmtree(sd_turbo_base / "text_encoder")
    again = DiffDISPipeline.from_pretrained(unet_dir, base=sd_turbo_base)
    assert torch.equal(run(pipe), run(again))


def test_model_folder_with_text_encoder_encodes_once_and_caches(tmp_path, official_tiny):
    model = tmp_path / "model"
    shutil.copytree(official_tiny, model, ignore=shutil.ignore_patterns(EMPTY_EMBED_FILE, "inputs.*", "expected.*"))
    make_text_encoder(model)
    DiffDISPipeline.from_pretrained(model, base=None)
    cached = load_file(model / EMPTY_EMBED_FILE)["empty_text_embed"]
    assert torch.allclose(cached, encode_empty_prompt(model / "text_encoder", model / "tokenizer"))


def test_read_only_model_folder_still_loads(tmp_path, official_tiny):
    model = tmp_path / "model"
    shutil.copytree(official_tiny, model, ignore=shutil.ignore_patterns(EMPTY_EMBED_FILE))
    make_text_encoder(model)
    os.chmod(model, 0o555)
    try:
        if os.access(model, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        DiffDISPipeline.from_pretrained(model, base=None)
        assert not (model / EMPTY_EMBED_FILE).exists()
    finally:
        os.chmod(model, 0o755)


def test_text_encoder_config_with_wrong_hidden_size(tmp_path, official_tiny):
    make_text_encoder(tmp_path, config_hidden_size=1024)
    embed = encode_empty_prompt(tmp_path / "text_encoder", tmp_path / "tokenizer")
    assert embed.shape == (1, 2, 32)


def test_single_file_fp16_repack_with_base(tmp_path, official_tiny, sd_turbo_base, tiny_pipeline):
    """set-soft/RemBG DiffDIS_F16.safetensors: 'unet.'-prefixed UNet keys plus the 'positive' embedding."""
    state = load_file(official_tiny / "unet" / "diffusion_pytorch_model.safetensors")
    repack = {f"unet.{k}": v.half() if v.is_floating_point() else v for k, v in state.items()}
    repack["positive"] = load_file(official_tiny / EMPTY_EMBED_FILE)["empty_text_embed"].half()
    save_file(repack, str(tmp_path / "DiffDIS_F16.safetensors"))
    shutil.copytree(official_tiny / "unet", sd_turbo_base / "unet")  # the base's unet/config.json gives the shape
    (sd_turbo_base / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(sd_turbo_base / "text_encoder")  # must not be needed: the embedding is in the file
    pipe = DiffDISPipeline.from_pretrained(tmp_path / "DiffDIS_F16.safetensors", base=sd_turbo_base)
    assert (run(pipe) - run(tiny_pipeline)).abs().max() < 1e-2
    # A repack whose embedding comes from another text encoder: one line, before any image.
    repack["positive"] = torch.zeros(1, 2, 48, dtype=torch.float16)
    save_file(repack, str(tmp_path / "mismatched.safetensors"))
    with pytest.raises(DiffDISError, match=r"mismatched.safetensors: the empty-prompt embedding is 48 wide, "
                                           r"but the UNet's cross_attention_dim is 32"):
        DiffDISPipeline.from_pretrained(tmp_path / "mismatched.safetensors", base=sd_turbo_base)


def test_missing_vae_without_base_says_what_to_do(tmp_path, official_tiny):
    shutil.copytree(official_tiny / "unet", tmp_path / "unet")
    with pytest.raises(DiffDISError, match="no base model was given"):
        DiffDISPipeline.from_pretrained(tmp_path / "unet", base=None)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(DiffDISError, match="does not exist"):
        DiffDISPipeline.from_pretrained(tmp_path / "nowhere", base=None)


class FakeHub:
    """Serves repos from local folders through huggingface_hub.snapshot_download, recording requests."""

    def __init__(self, tmp_path, repos):
        self.repos, self.requests, self.root = repos, [], tmp_path / "hf-cache"

    def snapshot_download(self, repo_id, allow_patterns=None, local_dir=None, **kwargs):
        import fnmatch

        self.requests.append((repo_id, tuple(allow_patterns)))
        source = self.repos[repo_id]
        target = local_dir or self.root / repo_id.replace("/", "--")
        for path in source.rglob("*"):
            relative = path.relative_to(source).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(relative, p) for p in allow_patterns):
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target / relative)
        os.makedirs(target, exist_ok=True)
        return str(target)


def test_hub_repo_downloads_only_what_is_needed(tmp_path, official_tiny, monkeypatch):
    import huggingface_hub

    remote = tmp_path / "remote"
    shutil.copytree(official_tiny, remote, ignore=shutil.ignore_patterns(EMPTY_EMBED_FILE, "inputs.*", "expected.*"))
    make_text_encoder(remote)
    hub = FakeHub(tmp_path, {"qianyu1217/diffdis": remote})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)

    DiffDISPipeline.from_pretrained("qianyu1217/diffdis", base="stabilityai/sd-turbo")
    asked = [p for _, patterns in hub.requests for p in patterns]
    assert {repo for repo, _ in hub.requests} == {"qianyu1217/diffdis"}  # the base is never touched
    assert "text_encoder/*" in asked and "tokenizer/*" in asked  # no embedding yet: encode it once

    hub.requests.clear()
    DiffDISPipeline.from_pretrained("qianyu1217/diffdis", base="stabilityai/sd-turbo")
    asked = [p for _, patterns in hub.requests for p in patterns]
    assert "text_encoder/*" not in asked  # the cached embedding is used
    assert not any(p.startswith("text_encoder") for p in asked)


def test_offline_hub_failure_says_which_files_go_where(tmp_path):
    with pytest.raises(DiffDISError) as error:
        DiffDISPipeline.from_pretrained("qianyu1217/diffdis", base=None, cache_dir=tmp_path, local_files_only=True)
    lines = str(error.value).splitlines()
    assert lines[0].startswith("model=qianyu1217/diffdis: could not get unet/, vae/")
    assert len(lines) <= 10 and all(len(line) < 200 for line in lines)
    assert "hf download qianyu1217/diffdis" in lines[1] and "pass model=diffdis" in lines[2]
    assert "    unet/: config.json, diffusion_pytorch_model.safetensors" in lines
    assert "    vae/: config.json, diffusion_pytorch_model.safetensors" in lines


def test_base_repo_failure_names_the_base_option(tmp_path, official_tiny, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from diffdis_core.hub import option_names

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    shutil.copytree(official_tiny / "unet", tmp_path / "unet")
    with option_names(model="--model ", base="--base "), pytest.raises(DiffDISError) as error:
        DiffDISPipeline.from_pretrained(tmp_path / "unet", base="stabilityai/sd-turbo")
    lines = str(error.value).splitlines()
    assert lines[0].startswith("--base stabilityai/sd-turbo: could not get vae/")
    assert "then pass --base sd-turbo; it needs:" in lines[2] and "    vae/: config.json, " \
        "diffusion_pytorch_model.safetensors" in lines


@pytest.mark.parametrize("name", ["models/DiffDIS", "./DiffDIS", "~/no-such-diffdis-folder", "DiffDIS.safetensors"])
def test_a_name_that_looks_local_is_never_sent_to_the_hub(tmp_path, monkeypatch, name):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("sent to the Hub"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "diffdis").mkdir()
    with pytest.raises(DiffDISError, match="does not exist") as error:
        DiffDISPipeline.from_pretrained(name, base=None)
    assert len(str(error.value).splitlines()) == 1
    if name == "models/DiffDIS":
        assert "did you mean models/diffdis" in str(error.value)


# ---------------------------------------------------------------------------------------------- damaged files
def one_line_error(model, match, **kwargs):
    with pytest.raises(DiffDISError, match=match) as error:
        DiffDISPipeline.from_pretrained(model, base=None, **kwargs)
    message = str(error.value)
    assert len(message.splitlines()) == 1, message
    return message


def test_truncated_local_unet_says_truncated_not_download(tiny_model_dir):
    weights = tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = one_line_error(tiny_model_dir, "is truncated")
    assert str(weights) in message and f"{len(data) // 2:,} of {len(data):,} bytes" in message
    assert "replace it with a complete copy" in message and "download" not in message


def test_pickle_disguised_as_safetensors_is_named(tiny_model_dir):
    weights = tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save({"x": torch.zeros(2)}, weights)  # a zip archive
    one_line_error(tiny_model_dir, "is not a safetensors file")


def test_vae_missing_a_tensor_is_named_before_loading(tiny_model_dir):
    weights = tiny_model_dir / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["decoder.conv_out.bias"]
    save_file(state, str(weights))
    message = one_line_error(tiny_model_dir, "lacks 1 tensor")
    assert str(weights) in message and "decoder.conv_out.bias" in message


def test_truncated_vae_is_named(tiny_model_dir):
    weights = tiny_model_dir / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    one_line_error(tiny_model_dir, "is truncated")


@pytest.mark.parametrize("part", ["unet", "vae"])
def test_invalid_config_json_is_named(tiny_model_dir, part):
    config = tiny_model_dir / part / "config.json"
    config.write_text(config.read_text()[:-20])
    message = one_line_error(tiny_model_dir, "is not valid JSON")
    assert str(config) in message


def test_config_that_cannot_build_a_unet_is_named(tiny_model_dir):
    config = tiny_model_dir / "unet" / "config.json"
    data = json.loads(config.read_text())
    data["down_block_types"] = ["NoSuchBlock2D"] * 4
    config.write_text(json.dumps(data))
    one_line_error(tiny_model_dir, "cannot build a UNet")


def test_invalid_scheduler_config_is_named(tiny_model_dir):
    (tiny_model_dir / "scheduler" / "scheduler_config.json").write_text("{not json")
    one_line_error(tiny_model_dir, "scheduler_config.json is not valid JSON")


def test_empty_prompt_embedding_of_the_wrong_width_is_named(tiny_model_dir):
    embed = tiny_model_dir / EMPTY_EMBED_FILE
    save_file({"empty_text_embed": torch.zeros(1, 2, 16)}, str(embed))
    message = one_line_error(tiny_model_dir, "16 wide, but the UNet's cross_attention_dim is 32")
    assert str(embed) in message and "delete it" in message


def test_truncated_embedding_is_named(tiny_model_dir):
    embed = tiny_model_dir / EMPTY_EMBED_FILE
    embed.write_bytes(embed.read_bytes()[:50])
    one_line_error(tiny_model_dir, str(embed))


# ---------------------------------------------------------------------------------------------- hostile folders
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


def never_built(monkeypatch, part):
    """Building ``part`` fails the test: a hostile config must be refused before anything is allocated."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    cls = {"scheduler": DDPMScheduler, "vae": AutoencoderKL, "unet": UNet2DConditionModel}[part]

    def refuse(*args, **kwargs):
        raise AssertionError(f"the {part} was built before its config was checked")

    monkeypatch.setattr(cls, "__init__", refuse)


@pytest.mark.parametrize("config, change, expected", [
    (SCHEDULER_CONFIG, {"num_train_timesteps": 10**12}, "num_train_timesteps is 1000000000000, it must be a whole "
                                                         "number from 1 to 10000"),
    (SCHEDULER_CONFIG, {"num_train_timesteps": 10_001}, "num_train_timesteps is 10001"),
    (SCHEDULER_CONFIG, {"beta_schedule": "cosine_of_doom"}, "beta_schedule is 'cosine_of_doom', it must be one of linear"),
    (SCHEDULER_CONFIG, {"beta_end": "0.012"}, "beta_end is '0.012', it must be a number between 0 and 1"),
    (SCHEDULER_CONFIG, {"trained_betas": [0.5] * 1001}, "trained_betas has 1001 values for 1000 num_train_timesteps"),
    (SCHEDULER_CONFIG, {"rescale_betas_zero_snr": "no"}, "rescale_betas_zero_snr is 'no', it must be true or false"),
    ("unet/config.json", {"layers_per_block": 5}, "layers_per_block is 5, it must be a whole number from 1 to 4"),
    ("unet/config.json", {"transformer_layers_per_block": [1, 1, 1, 10**9]}, "transformer_layers_per_block is"),
    ("unet/config.json", {"block_out_channels": [2**40] * 4}, "block_out_channels is [1099511627776"),
    ("unet/config.json", {"cross_attention_dim": 10**7}, "cross_attention_dim is 10000000"),
    ("unet/config.json", {"down_block_types": ["DownBlock2D"] * 1000}, "down_block_types is ['DownBlock2D'"),
    ("unet/config.json", {"sample_size": 10**9}, "sample_size is 1000000000"),
    ("vae/config.json", {"layers_per_block": 10**6}, "layers_per_block is 1000000"),
    ("vae/config.json", {"latent_channels": 10**9}, "latent_channels is 1000000000"),
    ("vae/config.json", {"block_out_channels": [32] * 100}, "block_out_channels is [32"),
    ("vae/config.json", {"scaling_factor": "0.18215"}, "scaling_factor is '0.18215', it must be a number above 0"),
])
def test_config_values_that_size_allocations_are_bounded_before_use(tiny_model_dir, monkeypatch, config, change,
                                                                    expected):
    path = tiny_model_dir / config
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    never_built(monkeypatch, config.split("/")[0])
    message = one_line_error(tiny_model_dir, re.escape(expected))
    assert message.startswith(f"{path}: ")


def test_a_schedule_that_leaves_no_signal_is_refused(tiny_model_dir):
    path = tiny_model_dir / SCHEDULER_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), "trained_betas": [0.999999] * 1000}))
    one_line_error(tiny_model_dir, "leaves no signal at the last timestep")


@pytest.mark.parametrize("config", [SCHEDULER_CONFIG, "unet/config.json", "vae/config.json"])
@pytest.mark.parametrize("depth, expected", [(100_000, "is nested too deeply"), (40, "nested more than 16 levels")])
def test_deeply_nested_configs_are_one_line(tiny_model_dir, config, depth, expected):
    path = tiny_model_dir / config
    path.write_text('{"a": ' + "[" * depth + "]" * depth + "}")
    message = one_line_error(tiny_model_dir, expected)
    assert str(path) in message


def test_a_config_larger_than_any_config_is_not_read(tiny_model_dir):
    path = tiny_model_dir / SCHEDULER_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), "padding": "x" * (2 << 20)}))
    one_line_error(tiny_model_dir, "is larger than any config file")


def test_an_empty_scheduler_folder_is_passed_over(tmp_path, tiny_model_dir, sd_turbo_base, tiny_pipeline):
    """What an interrupted download leaves: the base's schedule is used, else SD-Turbo's built-in one."""
    shutil.rmtree(tiny_model_dir / "scheduler")
    (tiny_model_dir / "scheduler").mkdir()
    pipe = DiffDISPipeline.from_pretrained(tiny_model_dir, base=None)
    assert torch.equal(pipe.scheduler.alphas_cumprod, tiny_pipeline.scheduler.alphas_cumprod)
    base_config = sd_turbo_base / SCHEDULER_CONFIG
    base_config.write_text(json.dumps({**json.loads(base_config.read_text()), "num_train_timesteps": 500}))
    assert DiffDISPipeline.from_pretrained(tiny_model_dir, base=sd_turbo_base).scheduler.config.num_train_timesteps == 500


def test_text_encoder_sizes_come_from_its_weights(tmp_path):
    """Config values that size the CLIP text encoder cannot make it larger than its weights file."""
    make_text_encoder(tmp_path / "good")
    expected = encode_empty_prompt(tmp_path / "good" / "text_encoder", tmp_path / "good" / "tokenizer")
    make_text_encoder(tmp_path / "bad")
    path = tmp_path / "bad" / "text_encoder" / "config.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "num_hidden_layers": 3, "max_position_embeddings": 4096,
                                "intermediate_size": 10**6}))
    assert torch.equal(encode_empty_prompt(tmp_path / "bad" / "text_encoder", tmp_path / "bad" / "tokenizer"), expected)
    path.write_text(json.dumps({**data, "num_attention_heads": 3}))
    with pytest.raises(DiffDISError, match=r"config.json does not fit the text encoder in its weights \(The hidden size "
                                           r"\(32\) is not a multiple of the number of attention heads \(3\)"):
        encode_empty_prompt(tmp_path / "bad" / "text_encoder", tmp_path / "bad" / "tokenizer")


@pytest.mark.parametrize("part", ["", "unet", "unet/diffusion_pytorch_model.safetensors", "vae", "vae/config.json",
                                  EMPTY_EMBED_FILE])
def test_unreadable_model_files_are_one_line(shared_tmp_path, official_tiny, denied_read, part):
    """safetensors writes weights 0600: a model trained under one account and used under another."""
    model = shared_tmp_path / "model"
    shutil.copytree(official_tiny, model, ignore=shutil.ignore_patterns("inputs.*", "expected.*"))
    target = model / part if part else model
    with denied_read(target):
        message = one_line_error(model, "permission denied")
    assert message.startswith(f"{target}: this account may not read it") and "chmod" in message


def test_the_cached_embedding_is_readable_by_every_account(tmp_path, official_tiny):
    model = tmp_path / "model"
    shutil.copytree(official_tiny, model, ignore=shutil.ignore_patterns(EMPTY_EMBED_FILE, "inputs.*", "expected.*"))
    make_text_encoder(model)
    mask = os.umask(0o022)
    try:
        DiffDISPipeline.from_pretrained(model, base=None)
    finally:
        os.umask(mask)
    assert (model / EMPTY_EMBED_FILE).stat().st_mode & 0o777 == 0o644
