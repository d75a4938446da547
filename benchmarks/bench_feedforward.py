#!/usr/bin/env python
"""One SD3 feed-forward layer as `sd3tune generate --compile` runs it, against diffusers' own: the first linear
layer and its tanh-GELU fused into one matmul (cuBLASLt's GELU epilogue through sd3tune.inference's
fuse_gelu_epilogues) or not. Unfused, the matmul writes the 6144-wide activation and the GELU reads and writes it
again, ~0.8 GB per block and step at a CFG batch of 8 at 1024 px. Also the layer as `generate --fp8` runs it (both
matmuls in FP8 with row-wise scales, sd3tune.fp8): its time and how far its output is from diffusers' (relative).

On CUDA it times SD3 Medium's shape (1536 -> 6144 -> 1536, bf16, batch 8 = 4 images with CFG, 4096 image tokens, and
the 333-token text stream), eager and torch.compile'd. On CPU (a small float32 shape) both sides run diffusers' own
ops, because the fused op's CPU kernel computes the exact GELU instead of SD3's tanh one: the run there only shows
that the script works. What it measured on GPUs: README.md.

examples:
  python benchmarks/bench_feedforward.py
  python benchmarks/bench_feedforward.py --no-compile --repeats 20 --json /tmp/ff.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import NOT_ACCEPTANCE, Report, cuda_available, device_label, median  # noqa: E402

from sd3tune.fp8 import quantize_linears  # noqa: E402
from sd3tune.inference import fuse_gelu_epilogues  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (CUDA 50, CPU 10)")
    ap.add_argument("--no-compile", action="store_true", help="eager only (compiling takes ~10 s per variant)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    return ap.parse_args(argv)


def timed(fn, x, repeats: int, cuda: bool) -> float:
    """Median milliseconds per call after three warm-up calls (CUDA: events around the whole run, then / repeats)."""
    import torch

    for _ in range(3):
        fn(x)
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(repeats):
            fn(x)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeats
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t) * 1e3)
    return median(times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from diffusers.models.attention import FeedForward

    cuda = cuda_available()
    report = Report(args.json)
    report("bench", "feedforward")
    report("device", device_label(cuda))
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    dim, batch, streams = (1536, 8, {"image": 4096, "text": 333}) if cuda else (64, 2, {"image": 256, "text": 32})
    repeats = args.repeats or (50 if cuda else 10)
    report("shape", f"{dim} -> {4 * dim} -> {dim}, {dtype}, batch {batch}, tokens {streams}",
           "" if cuda else f"{NOT_ACCEPTANCE}; on CPU both sides are diffusers' own path")
    torch.manual_seed(0)
    plain = FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate").to(dev, dtype).eval()
    fused = copy.deepcopy(plain)
    report("fused_layers", fuse_gelu_epilogues(fused))
    fp8 = copy.deepcopy(plain)
    report("fp8_layers", quantize_linears(fp8))
    variants = {"unfused": plain, "fused": fused, "fp8": fp8}
    with torch.inference_mode():
        for stream, tokens in streams.items():
            x = torch.randn(batch, tokens, dim, device=dev, dtype=dtype)
            a, b, q = plain(x), fused(x), fp8(x)
            report(f"{stream}.max_abs_diff", round((a - b).abs().max().item(), 5),
                   f"outputs ~{a.abs().mean().item():.3f} on average; rounding only")
            report(f"{stream}.fp8_relative_error", round(((q - a).float().norm() / a.float().norm()).item(), 4),
                   "|fp8 - diffusers| / |diffusers|")
            ms = {name: timed(fn, x, repeats, cuda) for name, fn in variants.items()}
            if not args.no_compile and stream == "image":
                ms.update({f"{name}_compiled": timed(torch.compile(fn), x, repeats, cuda)
                           for name, fn in variants.items()})
            for name, value in ms.items():
                report(f"{stream}.{name}_ms", round(value, 4))
            report(f"{stream}.fused_vs_unfused", round(ms["fused"] / ms["unfused"], 3))
            best = "_compiled" if "fp8_compiled" in ms else ""
            report(f"{stream}.fp8_vs_fused", round(ms["fp8" + best] / ms["fused" + best], 3),
                   "compiled" if best else "eager")
    report.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
