"""Parity with the authors' implementation on the official_tiny fixture (see its README).

The fixture was computed by the authors' own code (their diffusers 0.30.2 fork, CPU, float32);
matching it to float32 rounding is how we know this is DiffDIS and not something like it.

Bounds hold on any CPU and thread count: errors are measured relative to the values' scale. The
one-step latents reach ~43 (x̂0 = (x_T - sqrt(1-ᾱ)·ε̂)/sqrt(ᾱ) magnifies ε̂'s rounding ~15x), so an
absolute bound that suits the O(1) maps would flake there with the summation order of the CPU's kernels.
"""

import pytest
import torch
from safetensors.torch import load_file

from diffdis_core import DiffDISUNet

TOLERANCE = 1e-4  # absolute, for the maps (values in [0, 1])
SCALED_TOLERANCE = 2e-5  # for the UNet output and the latents, of max(1, their largest magnitude)


@pytest.fixture(scope="module")
def fixture_io(official_tiny):
    return load_file(official_tiny / "inputs.safetensors"), load_file(official_tiny / "expected.safetensors")


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape
    return (actual.float() - expected.float()).abs().max().item()


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return max_error(actual, expected) / max(1.0, expected.abs().max().item())


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"{n}-threads")
def threads(request):
    """Run the test with 1, 2 and 3 intra-op threads (other summation orders)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


def test_unet_reproduces_authors_output(official_tiny, fixture_io, threads):
    inputs, expected = fixture_io
    unet = DiffDISUNet.from_pretrained(official_tiny, subfolder="unet")
    with torch.no_grad():
        out = unet(inputs["unet_input"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                   class_labels=inputs["class_labels"],
                   rgb_token=[inputs[f"rgb_token_{i}"] for i in range(4)])
    assert scaled_error(out.sample, expected["unet_output"]) <= SCALED_TOLERANCE


def test_each_diffdis_part_matters(official_tiny, fixture_io):
    """Removing BDE, DBIA or SWCI moves the output far beyond the tolerance: the parity test has teeth."""
    inputs, expected = fixture_io
    unet = DiffDISUNet.from_pretrained(official_tiny, subfolder="unet")
    kwargs = dict(encoder_hidden_states=inputs["encoder_hidden_states"],
                  rgb_token=[inputs[f"rgb_token_{i}"] for i in range(4)])
    with torch.no_grad():
        swapped_bde = unet(inputs["unet_input"], inputs["timestep"], class_labels=inputs["class_labels"].flip(0),
                           **kwargs).sample
        block = unet.mid_block.attentions[0].transformer_blocks[0]
        block.attn3.to_out[0].weight.zero_()
        block.attn3.to_out[0].bias.zero_()
        no_dbia = unet(inputs["unet_input"], inputs["timestep"], class_labels=inputs["class_labels"], **kwargs).sample
        for conv in [*unet.rgb_proj, *unet.rgb_proj1]:
            conv.weight.zero_()
            conv.bias.zero_()
        no_dbia_no_swci = unet(inputs["unet_input"], inputs["timestep"], class_labels=inputs["class_labels"],
                               **kwargs).sample
    assert scaled_error(swapped_bde, expected["unet_output"]) > 50 * SCALED_TOLERANCE
    assert scaled_error(no_dbia, expected["unet_output"]) > 50 * SCALED_TOLERANCE
    assert scaled_error(no_dbia_no_swci, no_dbia) > 50 * SCALED_TOLERANCE


def test_pipeline_stages_reproduce_authors_outputs(tiny_pipeline, fixture_io, threads):
    inputs, expected = fixture_io
    image = (inputs["rgb"] + 1) / 2  # the fixture's image is already in [-1, 1] at processing resolution 64
    condition = tiny_pipeline.encode_condition(image, processing_res=64)
    for index in range(4):
        assert scaled_error(condition.rgb_latents[index], inputs[f"rgb_token_{index}"][:1]) <= SCALED_TOLERANCE
    latents = tiny_pipeline.segment(condition, latents=inputs["noise"])
    denoised = torch.cat([latents.mask_latents, latents.edge_latents])
    assert scaled_error(denoised, expected["denoised_latents"]) <= SCALED_TOLERANCE
    raw = tiny_pipeline.decode(latents, minmax=False)
    assert max_error(raw.mask, expected["mask"]) <= TOLERANCE
    assert max_error(raw.edge, expected["edge"]) <= TOLERANCE


def test_pipeline_call_reproduces_authors_minmax_maps(tiny_pipeline, fixture_io, threads):
    inputs, expected = fixture_io
    out = tiny_pipeline((inputs["rgb"] + 1) / 2, processing_res=64, latents=inputs["noise"], minmax=True)
    assert max_error(out.mask, expected["mask_minmax"]) <= TOLERANCE
    assert max_error(out.edge, expected["edge_minmax"]) <= TOLERANCE
