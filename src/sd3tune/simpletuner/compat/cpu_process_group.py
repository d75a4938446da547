"""Fix 11: ``sd3tune train --gpus N`` (or a MULTI_GPU accelerate file) on a host without CUDA ran N independent
trainings, not one job. accelerate's launcher starts the N processes through torchrun (``multi_gpu_launcher``,
commands/launch.py) but sets no ``ACCELERATE_USE_CPU`` there (only ``prepare_simple_launcher_cmd_env`` does, for one
process). In each process ``AcceleratorState`` takes ``cpu`` from that variable alone (state.py) and
``PartialState._prepare_backend`` picks MULTI_CPU + gloo only when ``cpu`` is set; without it and without CUDA no
branch matches and the process falls back to DistributedType.NO: world size 1, rank 0, every process its own trainer
(SimpleTuner's sampler logged ``dp_size: 1, dp_rank: 0`` in each). ``accelerate launch --cpu --num_processes N`` is no
way out: without an MPI hostfile it starts one process. In a process torchrun started (``LOCAL_RANK`` and
``WORLD_SIZE`` > 1 set) on a host with no GPU, set ``ACCELERATE_USE_CPU`` before the Accelerator exists, so the
processes form one gloo process group."""

from __future__ import annotations

import os

from sd3tune.simpletuner.compat._patching import expect, has_accelerator

USE_CPU_ENV = "ACCELERATE_USE_CPU"


def requested() -> bool:
    try:
        return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def applies_to(state) -> str | None:
    return (expect(state, "AcceleratorState.__init__", source=(f'parse_flag_from_env("{USE_CPU_ENV}")',))
            or expect(state, "PartialState._prepare_backend", source=("DistributedType.MULTI_CPU", '"gloo"')))


def apply(state) -> None:
    import torch

    if not has_accelerator(torch):
        os.environ[USE_CPU_ENV] = "true"
