"""Several processes (GPUs, machines, or CPU processes) under ``accelerate launch``, done right.

``accelerate launch --multi_gpu --num_processes N`` on a machine without GPUs starts N processes whose
plain ``Accelerator()`` each see a world of one: N copies of the same run racing on the same files.
Here such a launch becomes a real CPU run (gloo, one rank per process, the cores shared out), and a
world size that accelerate does not see is refused in one line.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from .devices import pick_device
from .errors import DiffDISError

if TYPE_CHECKING:
    from accelerate import Accelerator, PartialState


def launched_world_size() -> int:
    """How many processes the launcher (accelerate launch, torchrun) started; 1 without one."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def accelerator_available() -> bool:
    """Whether a device that accelerate can give each process exists (CUDA or XPU)."""
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _use_cpu(cpu: bool) -> bool:
    use_cpu = cpu or (launched_world_size() > 1 and not accelerator_available())
    if use_cpu and launched_world_size() > 1 and "OMP_NUM_THREADS" not in os.environ:
        # Share the cores fairly between the processes on this machine.
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", launched_world_size())))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return use_cpu


def _check_world(num_processes: int) -> None:
    launched = launched_world_size()
    if num_processes != launched:
        raise DiffDISError(f"the launcher started {launched} processes but accelerate sees {num_processes}: "
                           "check the accelerate launch flags (--multi_gpu, --num_processes, --num_machines)")


def process_state(cpu: bool = False) -> PartialState:
    """accelerate's process state for inference (which process am I, of how many, on which device)."""
    from accelerate import PartialState

    state = PartialState(cpu=_use_cpu(cpu))
    _check_world(state.num_processes)
    return state


def make_accelerator(cpu: bool = False, **kwargs: Any) -> Accelerator:
    """An ``Accelerator`` for training that sees every launched process (gloo on CPU machines)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=_use_cpu(cpu), **kwargs)
    _check_world(accelerator.num_processes)
    return accelerator


def process_device(name: str = "auto") -> tuple[PartialState | None, torch.device]:
    """The device choice of the command lines: (accelerate's process state, this process's device) under a
    multi-process launch, where each process takes the launch's device (``name`` auto, or cpu to stay on
    the CPU); (None, ``pick_device(name)``) for a single process."""
    if launched_world_size() <= 1:
        return None, pick_device(name)
    if name not in ("auto", "cpu"):
        raise DiffDISError(f"--device {name}: under accelerate launch each process takes its own device; "
                           "use --device auto (or cpu)")
    state = process_state(cpu=name == "cpu")
    return state, state.device
