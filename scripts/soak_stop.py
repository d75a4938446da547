"""Soak `sd3tune train`'s stop: N trials, each a tiny training hit by a random signal at a random moment, then resumed.

Each trial initialises a tiny run (the tiny SD3 of ``sd3tune.tiny``, 64 px, CPU-sized), starts ``sd3tune train RUN``,
sends it SIGINT, SIGTERM, SIGHUP or SIGKILL a random delay (seeded) after the launch or after SimpleTuner's first
step, waits for it to end, and 3 s later counts the processes still working in the run folder (orphans; they are then
killed). A checkpoint without its ``.guard`` or whose safetensors do not load is corrupt (and removed, as sd3tune's
hint says). Then it continues as a user would (``sd3tune train RUN --resume``, or without ``--resume`` when no
checkpoint was kept) and counts a clean resume when that finishes the run. Lost steps: the steps trained before the
signal that no kept checkpoint holds. Unrecorded stops: a launched training's stop that sd3tune saw (all
but a SIGKILL of sd3tune itself) without its entry in the run's sd3tune.json.

    python scripts/soak_stop.py --trials 20 --seed 1 --work /tmp/soak [--steps 6] [--max-delay 40]

Prints ``key: value`` lines and a final ``RESULT {json}`` line; exit code 1 when any trial left an orphan, a corrupt
checkpoint that a guard vouched for, or failed to resume.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL)


def processes_in(folder: Path) -> list[int]:
    """Processes whose working directory is ``folder`` (SimpleTuner runs in the run folder)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cwd").resolve() == folder.resolve():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def sd3tune(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sd3tune", *args], capture_output=True, text=True, env=env(),
                          timeout=timeout)


def last_step(log_dir: Path, since: float) -> int:
    """The last step SimpleTuner's progress bar showed in the logs written since ``since``."""
    from sd3tune.simpletuner.launch import parse_progress

    step = 0
    for log in sorted(log_dir.glob("train-*.log")):
        if log.stat().st_mtime >= since:
            for line in re.split(r"[\r\n]", log.read_text(errors="replace")):
                progress = parse_progress(line)
                if progress:
                    step = max(step, progress.step)
    return step


def corrupt_checkpoints(output: Path) -> list[Path]:
    """Checkpoints without ``.guard`` (a save cut short) or whose safetensors fail to load."""
    from safetensors import safe_open

    from sd3tune.simpletuner.layout import checkpoints

    bad = []
    for folder in checkpoints(output):
        ok = (folder / ".guard").is_file()
        for file in folder.glob("*.safetensors") if ok else ():
            try:
                with safe_open(str(file), "pt") as f:
                    for key in f.keys():
                        f.get_tensor(key)
            except Exception:  # noqa: BLE001 - any failure to load is what is counted
                ok = False
        if not ok:
            bad.append(folder)
    return bad


def trial(number: int, rng: random.Random, work: Path, model: Path, data: Path, steps: int,
          max_delay: float) -> dict:
    from sd3tune.commands.init import run_init
    from sd3tune.commands.quickstart import tiny_init_options
    from sd3tune.simpletuner import keys
    from sd3tune.simpletuner.layout import checkpoint_step, checkpoints

    run = work / f"trial-{number}" / "run"
    shutil.rmtree(run.parent, ignore_errors=True)
    run_init(tiny_init_options(run, data, model, steps=steps, checkpoint_every=2))
    # the moment: after the launch (start-up, caching, loading), or after SimpleTuner's first step (steps, saves)
    sig, moment, delay = rng.choice(SIGNALS), rng.choice(("launch", "first step")), rng.uniform(0.5, max_delay)
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "sd3tune", "train", str(run)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env(), start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if moment == "first step":
        while proc.poll() is None and not last_step(run / "logs", started):
            time.sleep(0.1)  # polls the log
    try:
        proc.wait(timeout=delay)  # the random moment; a training done before it is no stop
        signalled = False
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
        signalled = True
    _, err = proc.communicate(timeout=180)
    time.sleep(3.0)  # the orphan criterion: alive 3 s after sd3tune ended
    orphans = processes_in(run)
    for pid in orphans:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    output = run / "output"
    trained = last_step(run / "logs", started)
    corrupt = corrupt_checkpoints(output)
    guarded_corrupt = [c.name for c in corrupt if (c / ".guard").is_file()]
    for folder in corrupt:
        shutil.rmtree(folder)
    kept = checkpoints(output)
    resumed_from = (checkpoint_step(kept[-1]) or 0) if kept else 0
    manifest = run / "sd3tune.json"  # the trial's run is new: its one training entry is this launch's
    trainings = json.loads(manifest.read_text()).get("trainings", []) if manifest.is_file() else []
    # every stop of a launched training that sd3tune could see is recorded (a SIGKILL of sd3tune itself leaves it
    # no moment to write; a signal before the launch, while sd3tune itself starts, stops no training)
    launched = any((run / "logs").glob("train-*.log"))
    recorded = not signalled or sig == signal.SIGKILL or not launched or (
        len(trainings) == 1 and trainings[0].get("status") in ("interrupted", "ok"))
    record = {"trial": number, "recorded": recorded, "signal": signal.Signals(sig).name if signalled else None,
              "after": f"{delay:.1f} s after the {moment}", "exit_code": proc.returncode, "trained_steps": trained,
              "orphans": len(orphans), "corrupt": [c.name for c in corrupt], "guarded_corrupt": guarded_corrupt,
              "resumed_from": resumed_from, "error": next((line for line in err.splitlines()
                                                           if line.startswith("error:")), None)}
    if proc.returncode == 0 or resumed_from >= steps:  # finished: nothing to resume
        record.update(clean_resume=True, lost_steps=0)
        return record
    if (output / keys.LORA_WEIGHT_NAME).is_file() and not kept:  # a final LoRA whose checkpoints were all cut
        shutil.rmtree(output)
    again = sd3tune("train", str(run), *(["--resume"] if kept else []))
    final = output / keys.LORA_WEIGHT_NAME
    record.update(clean_resume=again.returncode == 0 and final.is_file() and not processes_in(run),
                  lost_steps=max(0, trained - resumed_from))
    if again.returncode != 0:
        record["resume_error"] = again.stderr.strip().splitlines()[-1:] or [f"exit {again.returncode}"]
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, required=True, help="a folder for the tiny model and the trial runs")
    parser.add_argument("--steps", type=int, default=6, help="steps of each trial's run (a checkpoint every 2)")
    parser.add_argument("--max-delay", type=float, default=40.0,
                        help="the signal comes 0.5 s to this many seconds after the launch or the first step")
    args = parser.parse_args(argv)

    from sd3tune.commands.quickstart import TRIGGER
    from sd3tune.tiny import build_tiny_sd3, make_concept_images

    work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    model, data = work / "model", work / "data"
    if not (model / "model_index.json").is_file():
        build_tiny_sd3(model)
    if not data.is_dir():
        make_concept_images(data, count=8, size=64, trigger=TRIGGER)
    rng = random.Random(args.seed)
    records = []
    for number in range(args.trials):
        record = trial(number, rng, work, model, data, args.steps, args.max_delay)
        print(json.dumps(record), flush=True)
        records.append(record)
    result = {"trials": len(records), "clean_resumes": sum(r["clean_resume"] for r in records),
              "corrupt_checkpoints": sum(len(r["corrupt"]) for r in records),
              "guarded_corrupt_checkpoints": sum(len(r["guarded_corrupt"]) for r in records),
              "orphans": sum(r["orphans"] for r in records), "lost_steps": sum(r["lost_steps"] for r in records),
              "unrecorded_stops": sum(not r["recorded"] for r in records),
              "signals": sorted({r["signal"] for r in records if r["signal"]}), "seed": args.seed}
    for key, value in result.items():
        print(f"{key}: {value}")
    print("RESULT " + json.dumps(result), flush=True)
    failed = (result["orphans"] or result["guarded_corrupt_checkpoints"] or result["unrecorded_stops"]
              or result["clean_resumes"] < len(records))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
