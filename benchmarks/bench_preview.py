#!/usr/bin/env python
"""Benchmark `sd3tune preview` on a run of N captioned photos (default 100): must take <= 20 s on 2 cores.

Builds, in a temporary folder, N phone-photo-sized JPEGs (1200x800, 800x1200 and 1024x1024, every fifth one stored
landscape with EXIF orientation 6) and PNG cut-outs with transparency, with .txt captions, a skeleton SD3 folder and
a run written by `sd3tune init` (1024 px by default, the real default). Then times the whole `sd3tune preview RUN
--out DIR` in a fresh process (interpreter start, SimpleTuner's imports, its sample preparation of every image, the
PNGs and the contact sheet), pinned to at most --cores CPUs:

  load_avg        the machine's 1-minute load average before the timed run (a shared machine slows every figure)
  cli_s           `sd3tune preview` wall time, median of --repeat (cli_times_s: each; cli_exit: its exit status)
  import_only_s   a fresh process that only imports SimpleTuner's pieces (the same command's reference: on a
                  loaded machine both grow; cli_s - import_only_s is the preview's own work)
  cpu_s           user + system CPU seconds of the last preview process
  written         images written, buckets, and whether the contact sheet exists
  verdict         PASS when cli_s is within --budget and every image was written

Exit status 0 on PASS, 1 on FAIL.

examples:
  python benchmarks/bench_preview.py
  python benchmarks/bench_preview.py --images 20 --resolution 256 --json /tmp/preview.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import Report, median, verdict  # noqa: E402
from bench_check import make_skeleton_model  # noqa: E402

SIZES = [(1200, 800), (800, 1200), (1024, 1024), (1600, 900)]


def make_photos(folder: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        base = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)  # smooth, photo-like after the resize
        image = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)
        if i % 10 == 9:  # a cut-out with transparency
            image = image.convert("RGBA")
            image.putalpha(Image.linear_gradient("L").resize((w, h)))
            image.save(folder / f"photo_{i:04d}.png")
        else:
            exif = Image.Exif()
            if i % 5 == 0:
                exif[0x0112] = 6
            image.save(folder / f"photo_{i:04d}.jpg", exif=exif, quality=90)
        (folder / f"photo_{i:04d}.txt").write_text(f"bench-style, concept sketch number {i}, pencil on paper\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100, help="number of captioned images (default 100)")
    parser.add_argument("--resolution", type=int, default=1024, help="training resolution (default 1024)")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs (default 1)")
    parser.add_argument("--cores", type=int, default=2, help="CPUs the preview may use (default 2)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds allowed (default 20)")
    parser.add_argument("--no-reference", action="store_true", help="skip the import-only reference run")
    parser.add_argument("--keep", type=Path, help="build in this folder and keep it (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.images < 1 or args.repeat < 1 or args.cores < 1:
        raise SystemExit("--images, --repeat and --cores must be at least 1")

    report = Report(args.json)
    report("bench", "preview")
    report("images", args.images)
    report("resolution", args.resolution)
    report("budget_s", args.budget)
    base = args.keep or Path(tempfile.mkdtemp(prefix="sd3tune-bench-"))
    try:
        t = time.perf_counter()
        from sd3tune.commands.init import InitOptions, run_init

        make_photos(base / "data", args.images)
        make_skeleton_model(base / "model")
        run_init(InitOptions(run_dir=base / "run", data=base / "data", model=str(base / "model"),
                             trigger="bench-style", resolution=args.resolution, steps=500, force=True))
        report("build_s", round(time.perf_counter() - t, 1), f"photos, skeleton model, sd3tune init ({base})")
        cores = sorted(os.sched_getaffinity(0))[:args.cores]
        report("cores", len(cores))
        report("load_avg", round(os.getloadavg()[0], 2), "1-minute load before the timed run")
        pin = {"preexec_fn": lambda: os.sched_setaffinity(0, cores)}
        if not args.no_reference:
            t = time.perf_counter()  # the same command's reference: what importing SimpleTuner alone costs now
            subprocess.run([sys.executable, "-c", "from sd3tune.simpletuner.preview import import_simpletuner; "
                            "import_simpletuner()"], capture_output=True, **pin)
            report("import_only_s", round(time.perf_counter() - t, 2), "a fresh process importing SimpleTuner's "
                                                                       "pieces with the compat fixes, nothing else")
        times = []
        for _ in range(args.repeat):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "sd3tune", "preview", str(base / "run"), "--out",
                                   str(base / "preview"), "--force"], capture_output=True, text=True, **pin)
            times.append(time.perf_counter() - t)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cli_s = report("cli_s", round(median(times), 2), f"`sd3tune preview` in a fresh process, median of "
                                                         f"{args.repeat}")
        report("cli_times_s", [round(x, 2) for x in times])
        report("cli_exit", proc.returncode)
        if proc.returncode:
            report("cli_error", proc.stderr.strip().splitlines()[-1:])
        report("cpu_s", round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
               "user + system, the last run")
        record = base / "preview" / "preview.json"
        images = json.loads(record.read_text())["images"] if record.is_file() else []
        report("written", {"images": len(images), "buckets": len({i["bucket"] for i in images}),
                           "contact_sheet": (base / "preview" / "contact_sheet.png").is_file()})
        passed = proc.returncode == 0 and len(images) == args.images and cli_s <= args.budget
        report("verdict", verdict(passed), f"{args.images} images previewed within {args.budget:g} s")
        report.finish()
        return 0 if passed else 1
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
