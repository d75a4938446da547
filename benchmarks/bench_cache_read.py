#!/usr/bin/env python
"""What one training step of SimpleTuner spends reading its caches from disk, with and without compression.

Each SD3 step loads, through SimpleTuner's own LocalDataBackend.torch_load: one VAE latent (16 x 128 x 128 at
1024 px) and two text embeddings (the caption's and the empty prompt's, for caption dropout: 77 CLIP + 154 T5
tokens x 4096, plus a 2048-wide pooled vector). SimpleTuner gzips every cache file by default
(compress_disk_cache=true); this times that read path against plain files, on this machine's CPU (the cost is all
CPU: the files sit in the page cache after the first epoch).

Why it matters (SD3M size, 1024 px, batch 1, on a GPU): py-spy on SimpleTuner's training process showed its data
thread spending most of its time in gzip's DecompressReader (text embeddings, then latents) while the main thread
waited for the next batch in fetch_batch (how long: README.md). sd3tune therefore writes compress_disk_cache=false.

examples:
  python benchmarks/bench_cache_read.py              # SD3M sizes, fp32 and bf16 caches
  python benchmarks/bench_cache_read.py --repeats 50 --json /tmp/cache.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import Report, device_label, median  # noqa: E402

from sd3tune.datascan import CLIP_MAX_TOKENS, T5_MAX_TOKENS  # noqa: E402

LATENT = (16, 128, 128)          # SD3 VAE latent of a 1024 px image
PROMPT = (1, CLIP_MAX_TOKENS + T5_MAX_TOKENS, 4096)  # CLIP (77) + T5 (154) tokens, SD3's joint width
POOLED = (2048,)


def step_files(folder: Path, backend, dtype) -> list[str]:
    """Write one step's worth of cache files (as SimpleTuner would) and return their paths."""
    import torch

    gen = torch.Generator().manual_seed(0)

    def rand(shape):
        return torch.randn(shape, generator=gen).to(dtype)

    items = {"latent.pt": rand(LATENT),
             "caption.pt": {"prompt_embeds": rand(PROMPT), "pooled_prompt_embeds": rand(POOLED)},
             "empty.pt": {"prompt_embeds": rand(PROMPT), "pooled_prompt_embeds": rand(POOLED)}}
    paths = []
    for name, data in items.items():
        path = str(folder / name)
        backend.torch_save(data, path)
        paths.append(path)
    return paths


def time_reads(backend, paths: list[str], repeats: int) -> float:
    for p in paths:  # warm the page cache, like every epoch after the first
        backend.torch_load(p)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for p in paths:
            backend.torch_load(p)
        times.append(time.perf_counter() - t)
    return median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20, help="timed reads of one step's files (median)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    from sd3tune.simpletuner.compat import install

    install()  # SimpleTuner as the training process has it (and imported in less time)
    import torch
    from simpletuner.helpers.data_backend.local import LocalDataBackend

    report = Report(args.json)
    report("bench", "cache_read")
    report("device", f"{device_label(False)}, {torch.get_num_threads()} torch threads")
    report("per_step", f"1 latent {LATENT} + 2 text embeddings {PROMPT} + pooled {POOLED}")
    for dtype in (torch.float32, torch.bfloat16):
        tag = str(dtype).replace("torch.", "")
        result = {}
        for compress in (True, False):
            backend = LocalDataBackend(accelerator=None, id="bench", compress_cache=compress)
            with tempfile.TemporaryDirectory() as td:
                paths = step_files(Path(td), backend, dtype)
                size = sum(Path(p).stat().st_size for p in paths)
                result[compress] = time_reads(backend, paths, args.repeats)
            name = "gzip" if compress else "plain"
            report(f"{tag}.{name}.mib_per_step", round(size / 2**20, 2))
            report(f"{tag}.{name}.ms_per_step", round(result[compress] * 1e3, 2), f"median of {args.repeats}")
        report(f"{tag}.gzip_over_plain", round(result[True] / result[False], 1))
    report.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
