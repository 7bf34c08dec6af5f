"""keep_freed_memory(): on glibc, a freed large tensor's memory is reused instead of faulted in anew."""

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Allocate, touch and free a 64 MB tensor twice; print the page faults of the second round.
PROBE = textwrap.dedent("""
    import resource, sys
    import torch
    from diffdis_core.devices import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    def cycle():
        x = torch.ones(16 * 2**20)
        del x
    cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cycle()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def page_faults(mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(run.stdout.split()[-1])


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_activations_are_reused_without_page_faults():
    assert page_faults("default") > 10_000  # 64 MB of fresh pages: the cost being removed
    assert page_faults("keep") < 1_000
