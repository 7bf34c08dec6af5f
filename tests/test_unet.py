"""DiffDISUNet: architecture, strict loading, and the training initialisation from SD-Turbo."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from diffdis_core import DiffDISError, DiffDISUNet
from diffdis_core.configs import SD_TURBO_UNET_CONFIG
from diffdis_core.pipeline import bde_labels



def test_full_size_model_has_exactly_the_released_tensors(official_tiny):
    """Built from SD-Turbo's config on the meta device (no 3.6 GB allocation)."""
    reference = json.loads((official_tiny.parent / "diffdis_unet_keys.json").read_text())
    with torch.device("meta"):
        unet = DiffDISUNet.from_config(SD_TURBO_UNET_CONFIG)
    shapes = {name: list(t.shape) for name, t in unet.state_dict().items()}
    assert len(shapes) == 730
    assert shapes == reference
    assert sum(t.numel() for t in unet.state_dict().values()) == 912_929_287


def test_plain_sd_turbo_config_gets_the_diffdis_architecture(official_tiny):
    config = json.loads((official_tiny / "unet" / "config.json").read_text())
    assert config["in_channels"] == 4 and "class_embed_type" not in config
    unet = DiffDISUNet.from_pretrained(official_tiny, subfolder="unet")
    assert unet.conv_in.in_channels == 8
    assert unet.config.class_embed_type == "projection"
    assert unet.class_embedding.linear_1.in_features == 4
    assert [c[0].out_channels for c in unet.rgb_conv] == config["block_out_channels"][:3]
    assert not unet.training  # BatchNorm running statistics in use


def _write_unet(folder, state, official_tiny):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text((official_tiny / "unet" / "config.json").read_text())
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))


def test_missing_tensor_is_an_error_naming_it(tmp_path, official_tiny):
    state = load_file(official_tiny / "unet" / "diffusion_pytorch_model.safetensors")
    del state["rgb_proj1.2.weight"]
    _write_unet(tmp_path / "unet", state, official_tiny)
    with pytest.raises(DiffDISError, match=r"1 missing tensor\(s\) \[rgb_proj1\.2\.weight\]"):
        DiffDISUNet.from_pretrained(tmp_path / "unet")


def test_unexpected_tensor_is_an_error_naming_it(tmp_path, official_tiny):
    state = load_file(official_tiny / "unet" / "diffusion_pytorch_model.safetensors")
    state["mid_block.extra.weight"] = torch.zeros(3)
    _write_unet(tmp_path / "unet", state, official_tiny)
    with pytest.raises(DiffDISError, match=r"1 unexpected \[mid_block\.extra\.weight\]"):
        DiffDISUNet.from_pretrained(tmp_path / "unet")


def test_plain_sd_unet_is_not_silently_accepted(tmp_path, official_tiny):
    """An SD-Turbo UNet (no DiffDIS parts) must not load with random BDE/DBIA/SWCI layers."""
    config = json.loads((official_tiny / "unet" / "config.json").read_text())
    plain = UNet2DConditionModel.from_config(config)
    _write_unet(tmp_path / "unet", plain.state_dict(), official_tiny)
    with pytest.raises(DiffDISError, match="missing tensor"):
        DiffDISUNet.from_pretrained(tmp_path / "unet")


def test_wrong_shape_names_the_tensor(tmp_path, official_tiny):
    state = load_file(official_tiny / "unet" / "diffusion_pytorch_model.safetensors")
    state["conv_in.weight"] = state["conv_in.weight"][:, :4].contiguous()
    _write_unet(tmp_path / "unet", state, official_tiny)
    with pytest.raises(DiffDISError, match=r"conv_in\.weight is \(32, 4, 3, 3\)"):
        DiffDISUNet.from_pretrained(tmp_path / "unet")


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(DiffDISError, match="safetensors"):
        DiffDISUNet.from_pretrained(tmp_path, subfolder="unet")


def test_truncated_file_is_a_clear_error(tmp_path, official_tiny):
    data = (official_tiny / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DiffDISError, match="is truncated"):
        DiffDISUNet.from_pretrained(tmp_path, subfolder="unet")


def test_from_sd_turbo_initialisation(official_tiny):
    config = json.loads((official_tiny / "unet" / "config.json").read_text())
    torch.manual_seed(0)
    base = UNet2DConditionModel.from_config(config).eval()
    unet = DiffDISUNet.from_sd_turbo(base).eval()
    w = base.conv_in.weight
    assert torch.equal(unet.conv_in.weight, torch.cat([w, w], 1) / 2)
    assert torch.equal(unet.conv_in.bias, base.conv_in.bias)
    block = unet.mid_block.attentions[0].transformer_blocks[0]
    base_block = base.mid_block.attentions[0].transformer_blocks[0]
    for name in ("to_q", "to_k", "to_v"):
        assert torch.equal(getattr(block.attn3, name).weight, getattr(base_block.attn1, name).weight)
    assert torch.equal(block.norm2_.weight, base_block.norm1.weight)
    assert all(torch.count_nonzero(c.weight) == 0 for c in [*unet.rgb_proj, *unet.rgb_proj1])

    # With SWCI at zero and the same latent in both halves of conv_in, the new model's skip
    # connections are untouched and conv_in reproduces the base's first features exactly.
    latent = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(unet.conv_in(torch.cat([latent, latent], 1)), base.conv_in(latent), atol=1e-6)
        tokens = [torch.randn(2, 4, s, s) for s in (8, 4, 2, 1)]
        out = unet(torch.randn(2, 8, 8, 8), 999, torch.randn(2, 2, 32), class_labels=bde_labels(1, "cpu",
                   torch.float32), rgb_token=tokens).sample
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_odd_batch_is_rejected_by_dbia(official_tiny):
    unet = DiffDISUNet.from_pretrained(official_tiny, subfolder="unet")
    tokens = [torch.randn(1, 4, s, s) for s in (8, 4, 2, 1)]
    with pytest.raises(ValueError, match="even batch"):
        unet(torch.randn(1, 8, 8, 8), 999, torch.randn(1, 2, 32), class_labels=torch.zeros(1, 4), rgb_token=tokens)


def test_save_pretrained_round_trip(tmp_path, official_tiny):
    unet = DiffDISUNet.from_pretrained(official_tiny, subfolder="unet")
    unet.save_pretrained(tmp_path / "unet")
    again = DiffDISUNet.from_pretrained(tmp_path, subfolder="unet")
    original = unet.state_dict()
    assert all(torch.equal(original[k], v) for k, v in again.state_dict().items())
