"""Hardware presets for `sd3tune init --preset`. Each is a set of overrides on RunConfig's defaults.

Speed-relevant defaults shared by all presets (RunConfig defaults), measured with SD3-Medium-sized weights at
1024 px, batch 1, against the plain diffusers + peft loop (the ratios: benchmarks/README.md, "What the options
cost"): torch-adamw + norm clipping + no LoRA dropout instead of SimpleTuner's own defaults (adamw_bf16, value
clipping, dropout 0.1), which are far slower. Uncompressed caches (compress_disk_cache=false) take the gzip reads off
each step. Prefetching batches is on: with compat fix 7 seeded runs repeat exactly with it too. Gradients are
dropped, not zeroed, between steps (set_grads_to_none: the same LoRA, 192 kernels fewer per SD3M step). Compiling
(CompileSettings) is off: with CUDA graphs its steps are faster, but compiling delays the first step by minutes,
which pays only after thousands of steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    overrides: dict[str, dict[str, Any]]
    verified: bool = True  # trained end to end on a GPU of that size
    caveat: str = ""


PRESETS: dict[str, Preset] = {
    "80gb": Preset(
        "80gb", "A100/H100 80 GB: batch 4, no gradient checkpointing (~28 GB).",
        {"optim": {"train_batch_size": 4}, "precision": {"gradient_checkpointing": False}},
    ),
    "24gb": Preset(
        "24gb", "RTX 3090/4090 24 GB: batch 1, no gradient checkpointing (~11 GB, room for validation).",
        {"optim": {"train_batch_size": 1}, "precision": {"gradient_checkpointing": False}},
    ),
    "16gb": Preset(
        "16gb", "16 GB cards: int8-quanto base + gradient checkpointing, batch 1.",
        {"optim": {"train_batch_size": 1},
         "precision": {"gradient_checkpointing": True, "base_model_precision": "int8-quanto"}},
        verified=False,
        caveat="the 16gb preset is not yet proven on a GPU: int8-quanto died at the first step with torch 2.11; "
               "if it fails, try --preset 24gb with gradient checkpointing",
    ),
}
DEFAULT_PRESET = "24gb"


def merge(base: dict[str, dict[str, Any]], *layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Section-wise merge of override dicts (later layers win)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for layer in layers:
        for section, values in layer.items():
            if isinstance(values, dict):
                out.setdefault(section, {}).update(values)
            else:
                out[section] = values
    return out
