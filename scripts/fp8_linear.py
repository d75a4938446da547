"""bench_generate's compile-fp8 candidate (not in `sd3tune generate`): the transformer blocks' large matmuls in FP8.

Of a compiled 1024 px image on an H100 (~1.12 s at a CFG batch of 8), about half is the blocks' bf16 GEMMs: the
image stream's rows are 8 x 4096 tokens, so each q/k/v, output and feed-forward projection is a compute-bound
(32768 x 1536) @ (1536 x N) matmul. Hopper (and Ada) tensor cores run FP8 (e4m3) matmuls at twice the bf16 rate.
Here each such ``nn.Linear`` becomes a ``Float8Linear``:
- its weight is stored in e4m3 with one float32 scale per output channel (half the bf16 weight's memory);
- each call scales every input row by its own absolute maximum into e4m3 (under torch.compile this fuses into the
  kernel that produced the input, e.g. the norm and modulation before q/k/v), then one ``torch._scaled_mm``
  (CUTLASS row-wise kernel on sm89+, fast accumulation) applies both scales and the bias and returns the layer's dtype.
The adaLN modulation layers (one row per sample), the embedders and the final projection stay bf16.

This changes the images (e4m3 keeps 3 mantissa bits: a matmul's output moves ~3-4% of its size on random data), so
it could only ever be an opt-in of `generate`; bench_generate prints how far its images are from compile's. Applied on
CUDA only with bf16 weights on an sm89+ card (the row-wise kernel's terms), and on CPU (any float dtype) so CI runs it.
"""

from __future__ import annotations

from typing import Any

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` (rows, K) as e4m3 with one float32 scale per row ((rows, 1)): ``t ~= q * scale``."""
    scale = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class Float8Linear(torch.nn.Module):
    """An inference-only ``nn.Linear`` with an e4m3 weight (per output channel scales) and e4m3 inputs (per row)."""

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


def supported(transformer: Any) -> bool:
    """CPU (any float dtype), or a CUDA card of compute capability 8.9+ with bf16 weights (the row-wise kernel's
    output and bias dtype)."""
    weight = next(transformer.parameters())
    if weight.device.type == "cpu":
        return True
    return (weight.device.type == "cuda" and weight.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(weight.device) >= (8, 9))


def apply(transformer: Any) -> int:
    """Replace every ``nn.Linear`` inside ``transformer``'s blocks, except the norms' modulation layers, by a
    ``Float8Linear``; a feed-forward whose GELU ``generate --compile`` fused into its matmul goes back to diffusers'
    forward (linear, then GELU). Call after the LoRA is fused. Returns how many layers changed (0 where unsupported)."""
    from diffusers.models.activations import GELU

    if not supported(transformer):
        return 0
    changed = 0
    for block in getattr(transformer, "transformer_blocks", []):
        for name, module in list(block.named_modules()):
            if type(module) is GELU:
                module.__dict__.pop("forward", None)  # sd3tune's fused linear+GELU reads proj.weight
            for child_name, child in list(module.named_children()):
                if type(child) is torch.nn.Linear and not name.split(".")[-1].startswith("norm"):
                    setattr(module, child_name, Float8Linear(child))
                    changed += 1
    return changed
