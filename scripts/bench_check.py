#!/usr/bin/env python
"""Benchmark `sd3tune check` on a run with N captioned images (default 1,000): must take <= 2 s.

Builds, in a temporary folder, N small images of three aspect ratios in PNG, JPEG and WebP with .txt captions,
a skeleton SD3 diffusers folder (so the model check passes without weights), and a run written by `sd3tune init`.
Times `check_run` in-process (median of --repeat runs after one warm-up) and the whole `sd3tune check` command in
a fresh process (interpreter start and imports included), then prints PASS/FAIL against the budget.

Usage: .venv/bin/python scripts/bench_check.py [--images 1000] [--repeat 5] [--budget 2.0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = [(256, 256), (320, 256), (256, 320)]
FORMATS = ["png", "jpg", "webp"]


def make_images(folder: Path, n: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = random.Random(0)
    tiles = {size: Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3))) for size in SIZES}
    for i in range(n):
        size, fmt = SIZES[i % len(SIZES)], FORMATS[(i // len(SIZES)) % len(FORMATS)]
        tiles[size].save(folder / f"img_{i:05d}.{fmt}")
        words = " ".join(rng.choice(["castle", "forest", "river", "dragon", "lantern", "mist", "tower", "moss"])
                         for _ in range(rng.randint(4, 30)))
        (folder / f"img_{i:05d}.txt").write_text(f"bench-style, concept art of a {words}, warm light\n")


def make_skeleton_model(folder: Path) -> None:
    """Enough of an SD3 diffusers folder for the check (it reads no weights)."""
    parts = {"transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"], "tokenizer_3": ["transformers", "T5TokenizerFast"]}
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline", **parts}))
    for part in parts:
        (folder / part).mkdir()
    for part in ("transformer", "vae"):
        (folder / part / "config.json").write_text("{}")
        (folder / part / "diffusion_pytorch_model.safetensors").write_bytes(b"")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="number of captioned images (default 1000)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs after the warm-up (default 5)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds allowed (default 2.0)")
    parser.add_argument("--keep", type=Path, help="build in this folder and keep it (default: a temp folder)")
    args = parser.parse_args()

    base = args.keep or Path(tempfile.mkdtemp(prefix="sd3tune-bench-"))
    try:
        t = time.perf_counter()
        from sd3tune.commands.init import InitOptions, run_init

        make_images(base / "data", args.images)
        make_skeleton_model(base / "model")
        run_init(InitOptions(run_dir=base / "run", data=base / "data", model=str(base / "model"), trigger="bench-style",
                             resolution=256, steps=500))
        print(f"built {args.images} images + run in {time.perf_counter() - t:.1f} s ({base})")

        t = time.perf_counter()
        from sd3tune.checks import check_run

        import_s = time.perf_counter() - t
        report = check_run(base / "run")  # warm-up (catalog, PIL plugins, page cache)
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            report = check_run(base / "run")
            times.append(time.perf_counter() - t)
        median = statistics.median(times)
        s = report.summary
        print(f"check_run: median {median:.3f} s over {args.repeat} runs (min {min(times):.3f}, max {max(times):.3f});"
              f" import {import_s:.3f} s; {s.images} images, {len(s.buckets)} bucket(s), {s.steps} steps, "
              f"{len(report.errors)} errors, {len(report.warnings)} warnings")
        if not report.ok:
            for f in report.errors:
                print(f"  unexpected error: {f.render()}")

        cli = []
        for _ in range(3):
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "sd3tune", "check", str(base / "run")],
                                  capture_output=True, text=True)
            cli.append(time.perf_counter() - t)
        cli_median = statistics.median(cli)
        print(f"`sd3tune check` in a fresh process: median {cli_median:.3f} s of 3 (exit {proc.returncode})")

        passed = median <= args.budget and cli_median <= args.budget and report.ok
        print(f"{'PASS' if passed else 'FAIL'}: check_run {median:.3f} s, CLI {cli_median:.3f} s for {args.images} "
              f"images (budget {args.budget:.1f} s)")
        return 0 if passed else 1
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
