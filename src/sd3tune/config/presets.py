"""Hardware presets for `sd3tune init --preset`. Each is a set of overrides on RunConfig's defaults.

Speed-relevant defaults shared by all presets (RunConfig defaults), measured with SD3-Medium-sized weights at
1024 px, batch 1, against the plain diffusers + peft loop (the ratios: benchmarks/README.md, "What the options
cost"): torch-adamw + norm clipping + no LoRA dropout instead of SimpleTuner's own defaults (adamw_bf16, value
clipping, dropout 0.1), which are far slower. Uncompressed caches (compress_disk_cache=false) take the gzip reads off
each step. Prefetching batches is on: with compat fix 7 seeded runs repeat exactly with it too. Gradients are
dropped, not zeroed, between steps (set_grads_to_none: the same LoRA, 192 kernels fewer per SD3M step). Compiling
(CompileSettings) is off: with CUDA graphs its steps are faster, but compiling delays the first step by minutes,
which pays only after thousands of steps.

The small-card presets (16gb, 12gb, 8gb) pay for memory only where the card needs it. SimpleTuner 4.10.1 already
unloads the text encoders once the caption embeddings are cached (``Trainer.init_unload_text_encoder``, to the meta
device), so they cost memory only while caching; T5-XXL (~9 GiB in bf16) is then the largest model on the card, hence
the int8 T5 below 16 GB (a text encoder with a precision set is loaded on the CPU and quantised there before it
moves: simpletuner/helpers/models/common.py:3118). ``quantize_via`` places only the base model's quantisation (on
the GPU it holds the 3.8 GiB of bf16 weights while quantising): left at SimpleTuner's default. 8-bit optimizer states
would save nothing worth having: a rank-16 LoRA of SD3 Medium's attention has 4.7 M parameters (~38 MB of AdamW state
in fp32), and bitsandbytes is not in the environment. SimpleTuner's ``gradient_checkpointing_interval`` is no cheaper
checkpointing for SD3: it checkpoints segments of N blocks (``checkpoint_sequential``), each block still recomputed
once.
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
        "16gb", "16 GB cards: batch 1, no gradient checkpointing, bf16 base (the 24gb training, ~10.4 GiB).",
        {"optim": {"train_batch_size": 1}, "precision": {"gradient_checkpointing": False}},
        verified=False,
        caveat="unverified: the 16gb preset is not yet proven on a 16 GB card: its training step is the 24gb "
               "preset's (10.4 GiB peak on an H100 with SD3-Medium-sized weights), but caching with the real T5-XXL "
               "text encoder (~9 GiB in bf16) and validation sampling were never measured on 16 GB; if it runs out "
               "of memory, try --preset 12gb",
    ),
    "12gb": Preset(
        "12gb", "12 GB cards: batch 1, no gradient checkpointing, bf16 base; T5 quantised (int8) to cache the "
                "captions, no validation sampling.",
        {"optim": {"train_batch_size": 1}, "precision": {"gradient_checkpointing": False},
         "validation": {"enabled": False},
         "extra": {"text_encoder_3_precision": "int8-quanto"}},
        verified=False,
        caveat="unverified: the 12gb preset is a candidate, not measured on a GPU: the training step took 10.4 GiB "
               "on an H100 (nvidia-smi), close to a 12 GB card's limit; if it runs out of memory, try --preset 8gb",
    ),
    "8gb": Preset(
        "8gb", "8 GB cards: batch 1, gradient checkpointing (~2x slower steps), int8-quanto base, T5 quantised "
               "(int8) to cache the captions, no validation sampling.",
        {"optim": {"train_batch_size": 1},
         "precision": {"gradient_checkpointing": True, "base_model_precision": "int8-quanto"},
         "validation": {"enabled": False},
         "extra": {"text_encoder_3_precision": "int8-quanto"}},
        verified=False,
        caveat="unverified: the 8gb preset is a candidate, not measured on a GPU: its int8-quanto base trains on "
               "CPU (sd3tune's compat fix 19 removed the crash it had at the first step on an H100), but no 8 GB "
               "run was measured",
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
