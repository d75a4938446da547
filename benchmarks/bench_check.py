#!/usr/bin/env python
"""Benchmark `sd3tune check` on a run with N captioned images (default 1,000): must take <= 2 s.

Builds, in a temporary folder, N small images of three aspect ratios in PNG, JPEG and WebP with .txt captions,
a skeleton SD3 diffusers folder (so the model check passes without weights), and a run written by `sd3tune init`.
Times `check_run` in-process (median of --repeat runs after one warm-up) and the whole `sd3tune check` command in
a fresh process (interpreter start and imports included), then prints PASS/FAIL against the budget:

  import_s        importing sd3tune.checks in this process (before anything else of sd3tune's is loaded)
  check_run_s     check_run on the run, median of --repeat after one warm-up (check_run_times_s: each run)
  summary         what the check saw: images, buckets, steps, errors, warnings (unexpected_errors: any errors)
  cli_s           `sd3tune check RUN` in a fresh process, median of 3 (cli_exit: its exit status)
  verdict         PASS when check_run_s and cli_s are within --budget and the check found no errors

Exit status 0 on PASS, 1 on FAIL.

examples:
  python benchmarks/bench_check.py
  python benchmarks/bench_check.py --images 200 --repeat 3 --json /tmp/check.json
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import Report, median, verdict  # noqa: E402

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="number of captioned images (default 1000)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs after the warm-up (default 5)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds allowed (default 2.0)")
    parser.add_argument("--keep", type=Path, help="build in this folder and keep it (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.images < 1 or args.repeat < 1:
        raise SystemExit("--images and --repeat must be at least 1")

    report = Report(args.json)
    report("bench", "check")
    report("images", args.images)
    report("budget_s", args.budget)
    t = time.perf_counter()
    from sd3tune.checks import check_run

    report("import_s", round(time.perf_counter() - t, 3), "import sd3tune.checks, in this process")
    base = args.keep or Path(tempfile.mkdtemp(prefix="sd3tune-bench-"))
    try:
        t = time.perf_counter()
        from sd3tune.commands.init import InitOptions, run_init

        make_images(base / "data", args.images)
        make_skeleton_model(base / "model")
        run_init(InitOptions(run_dir=base / "run", data=base / "data", model=str(base / "model"), trigger="bench-style",
                             resolution=256, steps=500))
        report("build_s", round(time.perf_counter() - t, 1), f"images, skeleton model, sd3tune init ({base})")

        findings = check_run(base / "run")  # warm-up (catalog, PIL plugins, page cache)
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            findings = check_run(base / "run")
            times.append(time.perf_counter() - t)
        check_s = report("check_run_s", round(median(times), 4), f"median of {args.repeat} after a warm-up")
        report("check_run_times_s", [round(x, 4) for x in times])
        s = findings.summary
        report("summary", {"images": s.images, "buckets": len(s.buckets), "steps": s.steps,
                           "errors": len(findings.errors), "warnings": len(findings.warnings)})
        if not findings.ok:
            report("unexpected_errors", [f.render() for f in findings.errors])

        cli = []
        for _ in range(3):
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "sd3tune", "check", str(base / "run")],
                                  capture_output=True, text=True)
            cli.append(time.perf_counter() - t)
        cli_s = report("cli_s", round(median(cli), 4), "`sd3tune check` in a fresh process, median of 3")
        report("cli_exit", proc.returncode)

        passed = check_s <= args.budget and cli_s <= args.budget and findings.ok
        report("verdict", verdict(passed), f"check_run and the CLI within {args.budget:.1f} s for {args.images} "
                                           "images, no errors")
        report.finish()
        return 0 if passed else 1
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
