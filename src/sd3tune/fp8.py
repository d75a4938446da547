"""`generate --fp8`: the SD3 transformer blocks' large matmuls in FP8 (e4m3) with row-wise scales.

About half of a compiled 1024 px image is the blocks' bf16 GEMMs (benchmarks/README.md): the image stream's rows
are 8 x 4096 tokens, so each q/k/v, output and feed-forward projection is a compute-bound (32768 x 1536) @
(1536 x N) matmul, and Hopper and Ada tensor cores run e4m3 matmuls at twice the bf16 rate. Each such
``nn.Linear`` becomes a ``Float8Linear``:
- its weight is stored in e4m3 with one float32 scale per output channel (half the bf16 weight's memory);
- each call scales every input row by its own absolute maximum into e4m3 (compiled, this fuses into the kernel that
  produced the input, e.g. the norm and modulation before q/k/v), then one ``torch._scaled_mm`` (row-wise scaling:
  cuBLASLt's kernel on sm90+ with cuBLAS 12.9+, else CUTLASS's; fast accumulation) applies both scales and the bias
  and returns the layer's dtype.
The adaLN modulation layers (one row per sample), the embedders and the final projection stay as they are.

e4m3 keeps 3 mantissa bits, so the images change slightly (a matmul's output moves ~3-4% of its size on random data);
hence an opt-in. CUDA needs compute capability 8.9+ and bf16 (the row-wise kernel's terms); the CPU computes the same
arithmetic (not faster), which is how the tests check it.
"""

from __future__ import annotations

from typing import Any

import torch

from sd3tune.errors import Sd3tuneError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def check_supported(device: str, dtype: torch.dtype) -> None:
    """Refuse ``--fp8`` where the row-wise FP8 matmul does not run, before the model loads."""
    if device == "cpu":
        return
    if device != "cuda":
        raise Sd3tuneError(f"--fp8 needs a CUDA GPU; {device} has no FP8 matmul", hint="drop --fp8")
    capability = torch.cuda.get_device_capability()
    if capability < (8, 9):
        raise Sd3tuneError(f"--fp8 needs an Ada, Hopper or newer GPU (compute capability 8.9+); "
                           f"{torch.cuda.get_device_name()} is {capability[0]}.{capability[1]}",
                           hint="drop --fp8 (--compile alone is the fast path on this GPU)")
    if dtype != torch.bfloat16:
        raise Sd3tuneError(f"--fp8 needs bf16 weights, not {str(dtype).replace('torch.', '')}",
                           hint="use --dtype bf16 (or auto)")


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` (rows, K) as e4m3 with one float32 scale per row ((rows, 1)): ``t ~= q * scale``."""
    scale = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class Float8Linear(torch.nn.Module):
    """An inference-only ``nn.Linear`` with an e4m3 weight (a scale per output channel) and e4m3 inputs (per row)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_fp8", weight)  # (out, in): its .t() is the column-major operand _scaled_mm wants
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, scale = quantize_rows(x.reshape(-1, self.in_features))
        y = torch._scaled_mm(rows, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias,
                             out_dtype=x.dtype, use_fast_accum=True)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_blocks(transformer: Any) -> int:
    """``quantize_linears`` on each of ``transformer``'s blocks. Returns how many layers changed."""
    return sum(quantize_linears(block) for block in getattr(transformer, "transformer_blocks", []))


def quantize_linears(module: torch.nn.Module) -> int:
    """Replace every ``nn.Linear`` inside ``module``, except the norms' (adaLN modulation) layers, by a
    ``Float8Linear`` (after any LoRA is fused: plain ``nn.Linear`` only). Returns how many layers changed."""
    changed = 0
    for name, parent in list(module.named_modules()):
        if name.rpartition(".")[2].startswith("norm"):
            continue
        for child_name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, child_name, Float8Linear(child))
                changed += 1
    return changed
