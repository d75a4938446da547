#!/usr/bin/env python
"""How fast the sd3tune command line starts, and what it imports.

  help_ratio   median wall time of `sd3tune --help` / median of `python -c "import typer, pydantic"`
               (interleaved runs, after one warm-up each); PASS when <= 1.5
  imports      the heavy libraries (torch, diffusers, simpletuner, ...) that `sd3tune --help` and
               `sd3tune check RUN` import; PASS when neither imports torch, diffusers or simpletuner
  check_s      median wall time of `sd3tune check` on a freshly initialised small run (for information)

Exit status 0 when everything passes, 1 otherwise.

examples:
  python benchmarks/bench_cli.py
  python benchmarks/bench_cli.py --runs 11 --json /tmp/cli.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import Report, median, verdict  # noqa: E402

MAX_RATIO = 1.5
FORBIDDEN = ("torch", "diffusers", "simpletuner")
HEAVY = FORBIDDEN + ("transformers", "accelerate", "peft", "safetensors", "numpy", "PIL")

# Runs the real CLI entry point in-process, then reports which heavy top-level packages got imported.
PROBE = """
import json, sys
from sd3tune.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = sorted({m.split('.')[0] for m in list(sys.modules)} & set(%r))
sys.stdout.flush()
sys.stderr.write('IMPORTED ' + json.dumps(heavy) + '\\n')
""" % (HEAVY,)


def sd3tune_command() -> list[str]:
    script = Path(sys.executable).parent / "sd3tune"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "sd3tune"]


def wall(cmd: list[str], env: dict[str, str], ok: tuple[int, ...] = (0,)) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    elapsed = time.perf_counter() - t
    if proc.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd)} failed with exit {proc.returncode}: {proc.stderr[-500:]}")
    return elapsed


def imported(args: list[str], env: dict[str, str]) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env)
    for line in proc.stderr.splitlines():
        if line.startswith("IMPORTED "):
            return json.loads(line[len("IMPORTED "):])
    raise SystemExit(f"import probe for {args} printed nothing: {proc.stderr[-500:]}")


def make_run(folder: Path) -> Path:
    """A small initialised run (8 images of 256 px) for `sd3tune check`; builds no model."""
    from sd3tune.commands.init import InitOptions, run_init
    from sd3tune.tiny import make_concept_images

    data = make_concept_images(folder / "images", count=8, size=256)
    run_dir = folder / "run"
    run_init(InitOptions(run_dir=run_dir, data=data, trigger="sd3tune-style", resolution=256, steps=10))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7, help="timed runs of each command (at least 5)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    runs = max(5, args.runs)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("SD3TUNE_DEBUG", None)
    report = Report(args.json)
    report("bench", "cli")
    report("python", sys.version.split()[0])
    cli = sd3tune_command()
    baseline = [sys.executable, "-c", "import typer, pydantic"]
    report("command", " ".join(cli + ["--help"]))
    wall(cli + ["--help"], env)
    wall(baseline, env)
    helps, bases = [], []
    for _ in range(runs):
        helps.append(wall(cli + ["--help"], env))
        bases.append(wall(baseline, env))
    h, b = median(helps), median(bases)
    report("help_s", round(h, 4), f"median of {runs}")
    report("import_typer_pydantic_s", round(b, 4), f"median of {runs}")
    r = report("help_ratio", round(h / b, 3), f"target <= {MAX_RATIO}")
    ok_time = r <= MAX_RATIO
    report("verdict_help_time", verdict(ok_time))

    with tempfile.TemporaryDirectory() as td:
        run_dir = make_run(Path(td))
        help_imports = report("help_imports", imported(["--help"], env))
        check_imports = report("check_imports", imported(["check", str(run_dir)], env))
        # exit 2 (findings with errors) is still a complete check; only the start-up cost matters here
        checks = [wall(cli + ["check", str(run_dir)], env, ok=(0, 2)) for _ in range(3)]
        report("check_s", round(median(checks), 4), "median of 3, information only")
    bad = sorted(set(help_imports + check_imports) & set(FORBIDDEN))
    ok_imports = not bad
    report("verdict_imports", verdict(ok_imports) + (f": imports {', '.join(bad)}" if bad else ""))
    report.finish()
    return 0 if ok_time and ok_imports else 1


if __name__ == "__main__":
    raise SystemExit(main())
