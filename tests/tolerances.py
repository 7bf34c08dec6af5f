"""Bounds for comparing float32 results that were computed in differently shaped batches.

oneDNN picks its convolution and matmul kernels per batch size, thread count and CPU (AMD hosts and
Intel AMX hosts differ), so the same image segmented alone, in a batch of 5 or in chunks of 2 differs
in the last bits, and the UNet, the VAE, the min-max and the aligned-median ensemble amplify that: up
to 1.7e-5 between chunked and whole batches on an Intel AMX host, 1e-4 between float32 and float64
with TTA + ensembling. A real error (another seed, image order, view or refinement) moves the maps by
0.1 to 0.7. The bound sits between the two, relative to the values' scale.
"""

import torch

KERNEL_NOISE = 1e-3  # of the values' scale (maps in [0, 1]: a quarter of an 8-bit grey level)


def assert_close_across_kernels(actual: torch.Tensor, expected: torch.Tensor, rel: float = KERNEL_NOISE) -> None:
    """``actual`` equals ``expected`` up to float32 kernel noise, relative to ``expected``'s scale."""
    actual, expected = torch.as_tensor(actual).float(), torch.as_tensor(expected).float()
    assert actual.shape == expected.shape, f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    bound = rel * max(1.0, expected.abs().max().item())
    error = (actual - expected).abs().max().item()
    assert error <= bound, f"max difference {error:.3g} exceeds {bound:.3g} (kernel noise bound)"
