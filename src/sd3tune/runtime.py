"""Where and how the models run: the --device / --dtype / --offload choices, the device and dtype they resolve to, and
keeping diffusers/transformers quiet. torch and the libraries load inside the functions."""

from __future__ import annotations

from sd3tune.errors import Sd3tuneError

DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("auto", "bf16", "fp16", "fp32")
OFFLOADS = ("none", "model", "sequential")


def check_runtime_choices(device: str, dtype: str, offload: str = "none") -> None:
    """Refuse a --device / --dtype / --offload value before anything loads."""
    for name, value, allowed, hint in (
            ("--device", device, DEVICES, "auto picks CUDA, then MPS, then the CPU"),
            ("--dtype", dtype, DTYPES, "auto is bf16 on a CUDA GPU that has it, else fp16 on a GPU, fp32 on the CPU"),
            ("--offload", offload, OFFLOADS, "model moves each model to the GPU when used (~16 GB cards); sequential "
                                             "moves each layer (least memory, slowest)")):
        if value not in allowed:
            raise Sd3tuneError(f"{name} {value!r} is not one of {', '.join(allowed)}", hint=hint)


def quiet_libraries() -> None:
    """Keep diffusers/transformers to errors and no loading bars: sd3tune prints its own progress. Called before
    they are first imported, it also has Python make its package map once for both (compat fix 18: ~0.6 s CPU each),
    and the process end without a garbage collection over all they load (compat fix 20: ~1.6 s)."""
    import gc
    import importlib.metadata
    import warnings

    from sd3tune.simpletuner.compat import frozen_heap_at_exit, package_map_once

    if package_map_once.applies_to(importlib.metadata) is None:  # a speed-up only: another Python goes without it
        package_map_once.apply(importlib.metadata)
    if frozen_heap_at_exit.applies_to(gc) is None:  # the same: ~1.6 s less at the exit of a process that loaded them
        frozen_heap_at_exit.apply(gc)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*torch_dtype.*")


def pick_device(device: str) -> str:
    import torch

    if device != "auto":
        if device == "cuda" and not torch.cuda.is_available():
            raise Sd3tuneError("--device cuda but no CUDA GPU is visible", hint="use --device auto or cpu")
        if device == "mps" and not torch.backends.mps.is_available():
            raise Sd3tuneError("--device mps but MPS is not available", hint="use --device auto or cpu")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(dtype: str, device: str):
    import torch

    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype != "auto":
        return table[dtype]
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32
