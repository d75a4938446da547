#!/usr/bin/env python
"""Time sd3tune's LoRA training step (SimpleTuner, with the `sd3tune init` defaults) against the plain
diffusers + peft loop (the anchor that benchmarks/anchor_sd3m.py times), in the same command on the same machine.

On a CUDA host it builds an SD3-Medium-sized model with random weights (no download; cached in --work), writes
1024 px images, runs the anchor in a fresh process, then `sd3tune init` + `sd3tune train` (through the Python API,
i.e. the real `accelerate launch` of SimpleTuner) for each variant, and prints per variant:

  s_per_step            steady-state seconds per step (arrival time of SimpleTuner's progress lines, after --warmup)
  time_to_first_step_s  from `sd3tune train` starting to step 1 done (imports, model load, caching, compile)
  peak_mem_gib          peak GPU memory in use (nvidia-smi, whole device, above idle); on CPU: RSS of the processes
  ratio_s_per_step      s_per_step / anchor s_per_step (acceptance: <= 0.9 at 1024 px, batch 1)

Without a GPU it runs the same path at tiny size (64 px, tiny random SD3) so CI keeps it working; those ratios
are printed with the label "tiny/CPU: not an acceptance number". --size deep keeps the tiny widths but has SD3
Medium's 24 transformer blocks: the step runs SD3M's ops on tiny tensors, a CPU proxy for the batch-1 GPU step
(bound by launching those ops from Python) that shows per-step overhead without a GPU; not an acceptance number.

Variants (--variants, comma-separated): default (exactly what `sd3tune init --preset P` writes: eager, batches
prefetched on a background thread), and, as SimpleTuner options on top of it: eager (no prefetching: the previous
default), eager-prefetch (= the default, spelled out), regional (per-block compile, no CUDA graphs),
regional-cudagraphs (+ dynamo_mode=reduce-overhead), regional-cudagraphs-noprefetch, regional-cudagraphs-cpp
(SimpleTuner's default C++ Inductor wrapper, which turns CUDA graphs off: "skipping cudagraphs due to cpp wrapper
enabled"), inductor (the whole model compiled), cuda-graphs (the default + `sd3tune train --cuda-graphs`: the
transformer's training forward and backward replayed from CUDA graphs, no compile), cuda-graphs-noprefetch,
fused-adamw (optimizer_config=fused=true: torch's fused AdamW kernel), cuda-graphs-fused-adamw, traced-allocations
(the default with every Python allocation traced, as the pinned SimpleTuner ran before compat fix 10);
preset-16gb, preset-12gb, preset-8gb (what `sd3tune init --preset 16gb|12gb|8gb` writes, whatever --preset says),
preset-8gb-bf16 (the 8gb preset without its int8 base). Every variant reports max_memory_reserved_gib:
torch.cuda.max_memory_reserved in the training process (n/a on CPU).
Each variant compiles with an empty compile cache of its own (what a first run sees); --warm-cache shares one.

--anchor-json FILE takes the anchor from benchmarks/anchor_sd3m.py's anchor.json (its
train_bs<batch>_nockpt_s_per_step row), written by that script earlier in the same command on the same machine.

examples:
  python benchmarks/bench_train.py                                  # CPU: tiny; CUDA: SD3M size, default variant
  python benchmarks/bench_train.py --variants default,regional,regional-cudagraphs --json /tmp/train.json
  python benchmarks/bench_train.py --extra attention_mechanism=diffusers  # any SimpleTuner option, every variant
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd3tune.simpletuner import keys  # noqa: E402
import step_profile  # noqa: E402
from sd3tune.simpletuner.launch import clean_line, cuda_graphs_message  # noqa: E402
from _bench_common import (SIZES, PeakMemory, Report, acceptance_label, anchor_row,  # noqa: E402
                           ensure_data, model_for, parse_variants, ratio, run_self, small, start, verdict)

# Each variant: SimpleTuner options on top of what `sd3tune init` writes (default: nothing on top).
_EAGER = {"dynamo_backend": "no"}
_REGIONAL = {"dynamo_backend": "inductor", "dynamo_use_regional_compilation": True, "dynamo_wrapper": "python"}
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "eager": {**_EAGER, "dataloader_prefetch": False},
    "eager-prefetch": {**_EAGER, "dataloader_prefetch": True},
    "regional": {**_REGIONAL, "dynamo_mode": "default", "dataloader_prefetch": True},  # no CUDA graphs
    "regional-cudagraphs": {**_REGIONAL, "dynamo_mode": "reduce-overhead", "dataloader_prefetch": True},
    "regional-cudagraphs-noprefetch": {**_REGIONAL, "dynamo_mode": "reduce-overhead", "dataloader_prefetch": False},
    # SimpleTuner's own default wrapper: C++, which skips CUDA graphs and compiles longer (README.md)
    "regional-cudagraphs-cpp": {**_REGIONAL, "dynamo_mode": "reduce-overhead", "dynamo_wrapper": "cpp"},
    "inductor": {**_REGIONAL, "dynamo_use_regional_compilation": False, "dynamo_mode": "default"},  # whole model
    "cuda-graphs": {**_EAGER, "dataloader_prefetch": True},  # + `sd3tune train --cuda-graphs` (TRAIN_OPTIONS)
    "cuda-graphs-noprefetch": {**_EAGER, "dataloader_prefetch": False},
    # torch's fused AdamW kernel (one launch for all LoRA tensors) instead of its foreach one: the optimizer is a few
    # per cent of an eager step in py-spy (README.md)
    "fused-adamw": {**_EAGER, "dataloader_prefetch": True, "optimizer_config": "fused=true"},
    "cuda-graphs-fused-adamw": {**_EAGER, "dataloader_prefetch": True, "optimizer_config": "fused=true"},
    # the default as the pinned SimpleTuner ran it before compat fix 10: every Python allocation traced from its data
    # backend factory on (tracemalloc started there in the training process; BENCH_SITE_ENV), to measure what that
    # fix gains on this machine
    "traced-allocations": {},
}
# The small-card presets (issue 32): a variant that is `sd3tune init --preset P` as written, its peak GPU memory read
# as torch's max_memory_reserved in the training process (`V.max_memory_reserved_gib`); 8gb-bf16 is the 8gb preset
# without the int8 base (does checkpointing alone fit 8 GB?).
PRESET_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "preset-16gb": ("16gb", {}), "preset-12gb": ("12gb", {}), "preset-8gb": ("8gb", {}),
    "preset-8gb-bf16": ("8gb", {"base_model_precision": "no_change"}),
}
VARIANTS.update({name: extra for name, (_, extra) in PRESET_VARIANTS.items()})
TRACED_ALLOCATIONS = {"traced-allocations"}
# Variants that also set `sd3tune train` options (TrainOptions fields), not only SimpleTuner ones.
TRAIN_OPTIONS: dict[str, dict[str, Any]] = {name: {"cuda_graphs": True} for name in VARIANTS
                                            if name.startswith("cuda-graphs")}
# What SimpleTuner resolved (OUTPUT_DIR/simpletuner_config.json): proves which settings the run really used.
RESOLVED = ["optimizer", "grad_clip_method", "max_grad_norm", "lora_dropout", "lora_rank", "gradient_checkpointing",
            "base_model_precision", "text_encoder_3_precision", "validation_disable",
            "mixed_precision", "train_batch_size", "resolution", "attention_mechanism", "dynamo_backend",
            "dynamo_mode", "dynamo_use_regional_compilation", "dynamo_wrapper", "dataloader_prefetch",
            "compress_disk_cache", "optimizer_config", "set_grads_to_none"]
SPEED_OPTIONS = {"dynamo_backend", "dynamo_mode", "dynamo_use_regional_compilation", "dynamo_wrapper",
                 "dataloader_prefetch", "compress_disk_cache", "optimizer_config", "set_grads_to_none"}
TARGET_RATIO = 0.9
TARGET_FIRST_STEP_S = 60.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["auto", *SIZES], default="auto",
                    help="model size: auto = sd3m on CUDA, tiny on CPU; deep = tiny widths, SD3M's 24 blocks")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sd3tune-bench"),
                    help="working folder: the random model and images are built once here and reused")
    ap.add_argument("--variants", default="default", help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE",
                    help="a SimpleTuner option added to every variant (repeatable)")
    ap.add_argument("--preset", default=None, help="sd3tune init preset (default: init's default)")
    ap.add_argument("--format", choices=["env", "json"], default="env",
                    help="config file sd3tune init writes (init's default: env)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (sd3m 120, tiny 12)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of s/step (sd3m 10, tiny 4)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's)")
    ap.add_argument("--resolution", type=int, default=None, help="pixels (sd3m 1024, tiny 64)")
    ap.add_argument("--images", type=int, default=None, help="training images (sd3m 16, tiny 8)")
    ap.add_argument("--anchor", choices=["ours", "none"], default="ours",
                    help="ours: the plain loop in _bench_common.py (anchor_sd3m.py's rows: --anchor-json)")
    ap.add_argument("--anchor-json", type=Path, default=None,
                    help="anchor_sd3m.py's anchor.json from the same command: use its training row as the anchor")
    ap.add_argument("--anchor-text-tokens", type=int, default=154,
                    help="text tokens of the anchor's step (anchor_sd3m.py's: 77 + 77)")
    ap.add_argument("--warm-cache", action="store_true",
                    help="share PyTorch's compile cache between variants and runs (default: a cold one per variant)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the timed steps, profile N more steps of every run and of the anchor "
                         "(step_profile.py: GPU busy time, kernels, CUDA syncs and where they come from)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    return ap.parse_args(argv)


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def init_variant(name: str, extra: dict[str, Any], args: argparse.Namespace, model: Path, data: Path, size: str,
                 steps: int, resolution: int) -> tuple[Path, Any]:
    """`sd3tune init` for one variant: the preset's defaults plus only what a benchmark needs."""
    from sd3tune.commands.init import InitOptions, run_init
    from sd3tune.commands.quickstart import TINY_BACKEND, TINY_OVERRIDES
    from sd3tune.config.presets import DEFAULT_PRESET, merge

    run_dir = args.work / "runs" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    bench = {"validation": {"enabled": False},  # no sampling, no preview decoder from the Hub
             "checkpoints": {"step_interval": 100 * steps},  # no checkpoint inside the timed steps
             "data": {"resolution": resolution}}
    if args.batch is not None:
        bench["optim"] = {"train_batch_size": args.batch}
    overrides = merge(TINY_OVERRIDES, bench) if small(size) else bench
    overrides = merge(overrides, keys.from_simpletuner_args(extra))  # typed sections where sd3tune has a field
    preset = PRESET_VARIANTS[name][0] if name in PRESET_VARIANTS else args.preset or DEFAULT_PRESET
    result = run_init(InitOptions(run_dir=run_dir, data=data, model=str(model), preset=preset,
                                  steps=steps, overrides=overrides, format=args.format,
                                  image_backend_overrides=TINY_BACKEND if small(size) else {}, force=True))
    return run_dir, result.config


def run_anchor(args: argparse.Namespace, model: Path, size: str, cfg: Any, mem_kind: str, report: Report,
               warmup: int) -> float | None:
    batch, resolution, rank = cfg.optim.train_batch_size, cfg.data.resolution, cfg.lora.rank
    out = args.work / "anchor"
    out.mkdir(parents=True, exist_ok=True)
    row = f"train_bs{batch}_nockpt_s_per_step"
    recipe = ("plain diffusers + peft loop, 8 attention targets, rank 16, 1024 px (64 with --tiny), 154 text tokens, "
              "torch AdamW, no checkpointing")
    if args.anchor_json is not None:
        return anchor_row(args.anchor_json, row, "s_per_step", recipe, report, (f"train_bs{batch}_nockpt_peak_gib",),
                          anchor_batches_hint(args.anchor_json, batch))
    result_path = out / "anchor.json"
    result_path.unlink(missing_ok=True)
    t = time.perf_counter()
    with PeakMemory(mem_kind) as mem:
        proc = run_self(["anchor-train", "--model", str(model), "--resolution", str(resolution), "--batch", str(batch),
                         "--rank", str(rank), "--text-tokens", str(args.anchor_text_tokens),
                         "--warmup", str(min(warmup, 5)), "--steps", "20",
                         "--json", str(result_path),
                         *(["--profile", f"{args.profile}:{out / 'step-profile.json'}"] if args.profile else [])],
                        log=out / "anchor.log")
    if proc.returncode != 0 or not result_path.is_file():
        report("anchor.error", f"exit {proc.returncode}; log: {out / 'anchor.log'}")
        sys.stderr.write((out / "anchor.log").read_text()[-3000:])
        return None
    data = json.loads(result_path.read_text())
    report("anchor.source", "plain diffusers + peft loop (_bench_common.py anchor-train), fresh process")
    report("anchor.recipe", f"{data['targets']} attention targets, rank {data['rank']}, fp32 LoRA params, "
                            f"{data['dtype']} compute, torch AdamW, {data['text_tokens']} text tokens, "
                            f"{data['resolution']} px, batch {data['batch']}, no gradient checkpointing")
    report("anchor.time_to_first_step_s", data["time_to_first_step_s"], "anchor start (imports, load) to step 1 done")
    if args.profile:
        report_profile("anchor", out / "step-profile.json", report)
    report("anchor.wall_s", round(time.perf_counter() - t, 1))
    report("anchor.peak_mem_gib", mem.gib, mem.how)
    for key in ("torch_peak_allocated_gib", "torch_peak_reserved_gib"):
        if key in data:
            report(f"anchor.{key}", data[key])
    return report("anchor.s_per_step", data["s_per_step"])


def anchor_batches_hint(path: Path, batch: int) -> str:
    """Why anchor.json has no training row for ``batch``: the batch sizes it timed (anchor_sd3m.py: 1 and 4), or that
    it timed none."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    timed = sorted(int(m[1]) for k in data if (m := re.fullmatch(r"train_bs(\d+)_nockpt_s_per_step", k)))
    if not timed:
        return "no training rows: was anchor_sd3m.py run with --skip-train?"
    return (f"anchor_sd3m.py timed batch {' and '.join(map(str, timed))}, this run trains batch {batch}: pass "
            f"--batch {timed[0]} to compare")


def steady_seconds_per_step(marks: dict[int, float], total: int, warmup: int) -> float | None:
    """Seconds per step between the first progress line at or after ``warmup`` and the last one before the end
    (the final line can arrive only when the bar closes, after the LoRA is saved)."""
    points = sorted((s, t) for s, t in marks.items() if s >= 1)
    body = [p for p in points if p[0] < total] or points
    start = next((p for p in body if p[0] >= warmup), None)
    if start is None or not body or body[-1][0] <= start[0]:
        return None
    end = body[-1]
    return (end[1] - start[1]) / (end[0] - start[0])


def log_highlights(log: Path | None, limit: int = 8) -> tuple[list[str], int, list[str], bool]:
    """SimpleTuner's lines about compilation, CUDA graphs and attention (to see what the run really did), how many
    graphs Inductor compiled, what sd3tune's CUDA-graph replay said (``train --cuda-graphs``), and whether the bench
    site traced Python allocations (variant traced-allocations): one read of the log for all four."""
    if log is None or not log.is_file():
        return [], 0, [], False
    found: list[str] = []
    said: list[str] = []
    compiled = 0
    traced = False
    pattern = re.compile(r"Torch Dynamo|kohaku|attention backend|native SDPA|skipping cudagraphs"
                         r"|cudagraph.*(skip|disabl)|recompil|TorchInductor wrapper", re.I)
    for line in re.split(r"[\r\n]", log.read_text(errors="replace")):
        line = clean_line(line)
        message = cuda_graphs_message(line)
        if message:
            said.append(message)
        elif "done compiling" in line:
            compiled += 1
        elif TRACING_MARK in line:
            traced = True
        elif pattern.search(line) and line[:200] not in found and not line.startswith("Extra args"):
            if len(found) < limit:
                found.append(line[:200])
    return found, compiled, said, traced


def not_applied(requested: dict[str, Any], resolved: dict[str, Any]) -> dict[str, Any]:
    """Requested SimpleTuner options that the run did not end up with (e.g. silently dropped config keys)."""
    def norm(v: Any) -> str:
        return str(v).strip().lower()

    return {k: resolved.get(k) for k, v in requested.items() if norm(resolved.get(k)) != norm(v)}


def cold_compile_cache(run_dir: Path) -> None:
    """Point Inductor's and Triton's caches at an empty folder of this run (the child inherits them), so a variant's
    compile time is what a first run sees, not a cache hit left by the variant before."""
    import os

    cache = run_dir / "compile-cache"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(cache / "triton")


BENCH_SITE = Path(__file__).resolve().parent / "_profile_site"
BENCH_SITE_ENV = "SD3TUNE_BENCH_TRACEMALLOC"  # "1": _profile_site starts tracemalloc (variant traced-allocations)
BENCH_MEMORY_ENV = "SD3TUNE_BENCH_MEMORY"  # FILE: _profile_site writes torch's peak GPU memory there at exit
TRACING_MARK = "sd3tune bench: tracing Python allocations"  # what _profile_site prints when it did


@contextlib.contextmanager
def bench_launches(profile: str | None, out: Path, trace_allocations: bool = False,
                   memory: Path | None = None) -> Iterator[None]:
    """While active, `sd3tune train` launches SimpleTuner with ``_profile_site`` loaded next to sd3tune's compat fixes:
    with ``profile``, the step profiler (step_profile.py) writing its summary to ``out``; with ``trace_allocations``,
    tracemalloc started as the pinned SimpleTuner left it; with ``memory``, torch's peak GPU memory of the training
    process written to that file at its exit. Benchmark aids: the product never loads them."""
    from sd3tune.commands import train

    if profile is None and not trace_allocations and memory is None:
        yield
        return
    original = train.build_launch

    def build_launch(*args: Any, **kwargs: Any) -> Any:
        plan = original(*args, **kwargs)
        env = {**plan.env, "PYTHONPATH": os.pathsep.join([str(BENCH_SITE), plan.env["PYTHONPATH"]])}
        if profile is not None:
            env[step_profile.ENV] = f"{profile}:{out}"
            if os.environ.get(step_profile.TRACE_ENV):
                env[step_profile.TRACE_ENV] = os.environ[step_profile.TRACE_ENV]
        if trace_allocations:
            env[BENCH_SITE_ENV] = "1"
        if memory is not None:
            env[BENCH_MEMORY_ENV] = str(memory)
        return dataclasses.replace(plan, env=env)

    train.build_launch = build_launch
    try:
        yield
    finally:
        train.build_launch = original


def report_profile(prefix: str, path: Path, report: Report) -> None:
    """The step profile's headline numbers as report lines (the whole summary stays in ``path``)."""
    if not path.is_file():
        report(f"{prefix}.profile", None, f"no profile written ({path}): did the run reach the profiled steps?")
        return
    prof = json.loads(path.read_text())
    report(f"{prefix}.profile", str(path))
    if "error" in prof:
        report(f"{prefix}.profile_error", prof["error"])
        return
    gpu = prof["gpu"]
    report(f"{prefix}.profile_wall_s_per_step", prof["wall_s_per_step"], "profiled steps (slowed by the profiler)")
    report(f"{prefix}.profile_gpu_busy_s_per_step", gpu["busy_s_per_step"],
           f"GPU busy fraction {gpu['busy_fraction']}, {gpu['kernels_per_step']} kernels per step")
    report(f"{prefix}.profile_sync_wait_s_per_step", prof["sync_wait_s_per_step"],
           "CPU time waiting in CUDA synchronisations and blocking copies")
    report(f"{prefix}.profile_sync_sites", prof["sync_sites"][:8])
    report(f"{prefix}.profile_gpu_ms_per_step_by_kind", gpu.get("by_kind_ms_per_step"))
    report(f"{prefix}.profile_top_kernels", gpu["top"][:6])
    report(f"{prefix}.profile_cpu_ops_per_step", prof["cpu_ops_per_step"], "profiler op events (nested), per thread")
    if "warning" in prof:
        report(f"{prefix}.profile_warning", prof["warning"])


def run_variant(name: str, run_dir: Path, extra: dict[str, Any], mem_kind: str, report: Report, warmup: int,
                timed: int, profile: str | None = None) -> dict[str, Any]:
    """One `sd3tune train` of the variant; s/step over steps ``warmup``..``timed - 1`` (with ``profile``, the run goes
    on past ``timed`` for the profiled steps)."""
    from sd3tune.commands.train import TrainOptions, run_train
    from sd3tune.errors import Sd3tuneError

    marks: dict[int, float] = {}
    losses: dict[int, float] = {}
    t0 = time.perf_counter()

    def on_progress(p) -> None:
        marks.setdefault(p.step, time.perf_counter() - t0)
        if p.loss is not None:
            losses[p.step] = p.loss  # the last line of a step carries its loss (the first, the previous one)

    phases: list[str] = []  # where the start-up time goes: SimpleTuner's phases as `sd3tune train` names them

    def on_status(text: str) -> None:
        phases.append(f"{time.perf_counter() - t0:.1f}s {text}")

    out: dict[str, Any] = {}
    error = None
    result = None
    profile_path = run_dir / "logs" / "step-profile.json"
    torch_peak = run_dir / "logs" / "torch-peak-memory.json"
    torch_peak.unlink(missing_ok=True)
    with PeakMemory(mem_kind) as mem, bench_launches(profile, profile_path, name in TRACED_ALLOCATIONS, torch_peak):
        try:
            result = run_train(TrainOptions(run_dir=run_dir, **TRAIN_OPTIONS.get(name, {})), on_progress=on_progress,
                               on_status=on_status)
        except Sd3tuneError as exc:
            error = exc.one_line()
    p = f"{name}."
    report(p + "phases", phases)
    if error is not None:
        out["error"] = report(p + "error", error)
        logs = sorted((run_dir / "logs").glob("train-*.log"))
        if logs:
            report(p + "log", str(logs[-1]))
        return out
    assert result is not None
    total = result.last.total if result.last else max(marks or {0: 0})
    report(p + "log", str(result.log))
    resolved_path = run_dir / "output" / keys.RESOLVED_CONFIG_NAME
    if resolved_path.is_file():
        resolved = json.loads(resolved_path.read_text())
        report(p + "simpletuner_resolved", {k: resolved.get(k) for k in RESOLVED})
        dropped = not_applied(extra, resolved)
        if dropped:
            out["error"] = report(p + "error", f"SimpleTuner did not apply {sorted(dropped)} (it resolved "
                                               f"{dropped}); the timings below are not this variant's")
    lines, compiled, said, traced = log_highlights(result.log)
    for i, line in enumerate(lines):
        report(p + f"log_line_{i}", line)
    if TRAIN_OPTIONS.get(name, {}).get("cuda_graphs"):
        report(p + "cuda_graphs", said, "what the training process said about replaying (sd3tune cuda-graphs: ...)")
        if mem_kind == "gpu" and not any(m.startswith("captured") for m in said):
            out["error"] = report(p + "error", "--cuda-graphs replayed nothing (see V.cuda_graphs): the timings below "
                                               "are eager ones")
    if name in TRACED_ALLOCATIONS and not traced:
        out["error"] = report(p + "error", "tracemalloc was not started in the training process: the timings below "
                                           "are the default's")
    report(p + "inductor_graphs_compiled", compiled)
    report(p + "steps", total)
    if 0 in marks:
        report(p + "startup_s", round(marks[0], 1), "`sd3tune train` start to SimpleTuner's step 0 (imports, load, "
                                                    "caching)")
    firsts = [t for s, t in marks.items() if s >= 1]
    if firsts:
        out["time_to_first_step_s"] = report(p + "time_to_first_step_s", round(min(firsts), 1))
        if 0 in marks:
            report(p + "first_step_s", round(min(firsts) - marks[0], 2), "step 1 alone (compiles happen here)")
    sps = steady_seconds_per_step(marks, min(total, timed), warmup)
    out["s_per_step"] = report(p + "s_per_step", None if sps is None else round(sps, 4),
                               f"steady state, steps {warmup}..{min(total, timed) - 1}")
    if result.last and result.last.seconds_per_step:
        report(p + "tqdm_s_per_step", round(result.last.seconds_per_step, 4),
               "SimpleTuner's smoothed rate, for comparison")
    report(p + "wall_s", round(result.seconds, 1))
    out["peak_mem_gib"] = report(p + "peak_mem_gib", mem.gib, mem.how)
    out["max_memory_reserved_gib"] = report(p + "max_memory_reserved_gib", *torch_peak_gib(torch_peak))
    out["losses"] = losses
    if profile:
        report_profile(name, profile_path, report)
    return out


def torch_peak_gib(path: Path) -> tuple[float | None, str]:
    """torch.cuda.max_memory_reserved of the training process (what _profile_site wrote at its exit), with a note."""
    try:
        peak = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, "n/a: the training process wrote no peak (it did not exit normally)"
    if peak.get("max_memory_reserved") is None:
        return None, "n/a: no CUDA in the training process"
    return round(peak["max_memory_reserved"] / 2**30, 2), (
        f"torch.cuda.max_memory_reserved in the training process; max allocated "
        f"{peak['max_memory_allocated'] / 2**30:.2f} GiB")


def loss_gap(a: dict[int, float], b: dict[int, float]) -> float | None:
    """Largest step-loss difference between two runs of one seed (SimpleTuner's progress line: 3 significant
    digits). Speed options that change nothing numerically keep it at ~0; a broken one shows from step 2 on."""
    common = sorted(set(a) & set(b))
    return max(abs(a[s] - b[s]) for s in common) if common else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = parse_variants(args.variants, VARIANTS)
    extra_all = {}
    for item in args.extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--extra {item!r} must be KEY=VALUE")
        extra_all[key.strip()] = _value(value.strip())
    cuda, size, report = start("train", args)
    # sd3m: 110 timed steps after 10 warm-up ones (seconds on a GPU): over 30, the rate moved between runs (README.md)
    steps = args.steps or (120 if size == "sd3m" else 12)
    warmup = args.warmup if args.warmup is not None else (10 if size == "sd3m" else 4)
    resolution = args.resolution or (1024 if size == "sd3m" else 64)
    if warmup >= steps - 1:
        raise SystemExit(f"--warmup {warmup} leaves nothing to time in {steps} steps")
    if args.profile < 0:
        raise SystemExit(f"--profile {args.profile}: the number of steps to profile, 0 (off) or more")

    model = model_for(args.work, size, report)
    data = ensure_data(args.work, args.images or (16 if size == "sd3m" else 8), resolution)

    # profiled steps come after the timed ones (the profiler slows them): START is the last timed step + 1
    profile = f"{steps + 1}:{args.profile}" if args.profile else None
    run_steps = steps + (args.profile + 2 if args.profile else 0)
    runs = {name: init_variant(name, {**VARIANTS[name], **extra_all}, args, model, data, size, run_steps, resolution)
            for name in names}
    cfg = runs[names[0]][1]
    first_preset = PRESET_VARIANTS[names[0]][0] if names[0] in PRESET_VARIANTS else args.preset or "default"
    report("config", {"preset": first_preset, "variant": names[0], "format": args.format,
                      "resolution": cfg.data.resolution,
                      "batch": cfg.optim.train_batch_size, "rank": cfg.lora.rank, "steps": steps, "warmup": warmup,
                      "optimizer": cfg.optim.optimizer, "grad_clip": cfg.optim.grad_clip_method,
                      "lora_dropout": cfg.lora.dropout, "gradient_checkpointing": cfg.precision.gradient_checkpointing,
                      "mixed_precision": cfg.precision.mixed_precision, "compile": cfg.compile.model_dump(),
                      "prefetch": cfg.data.prefetch, "extra": cfg.extra})
    mem_kind = "gpu" if cuda else "children"
    report("compile_cache", "shared (--warm-cache)" if args.warm_cache else "cold: an empty one per variant")
    anchor = None if args.anchor == "none" else run_anchor(args, model, size, cfg, mem_kind, report, warmup)

    failed = False
    losses: dict[str, dict[int, float]] = {}
    label = acceptance_label(cuda, size, (cfg.data.resolution, cfg.optim.train_batch_size) == (1024, 1),
                             "1024 px, batch 1")
    for name in names:
        run_dir, run_cfg = runs[name]  # the speed options and extras init wrote must all reach SimpleTuner
        if not args.warm_cache:
            cold_compile_cache(run_dir)
        wrote = {k: v for k, v in keys.to_simpletuner_args(run_cfg).items() if k in SPEED_OPTIONS or k in run_cfg.extra}
        out = run_variant(name, run_dir, wrote, mem_kind, report, warmup, steps, profile)
        losses[name] = out.get("losses", {})
        if name != "default" and losses.get("default"):
            report(f"{name}.loss_gap_vs_default", loss_gap(losses[name], losses["default"]),
                   "largest |step loss - default's step loss|, same seed and data")
        if "error" in out:
            failed = True
            if "s_per_step" not in out:
                continue
        r = report(f"{name}.ratio_s_per_step", ratio(out.get("s_per_step"), anchor),
                   "no anchor to compare with: see anchor.error" if anchor is None and args.anchor != "none"
                   else label or f"sd3tune / anchor, target <= {TARGET_RATIO}")
        first = out.get("time_to_first_step_s")
        report(f"{name}.verdict_step", verdict(None if r is None else r <= TARGET_RATIO, label))
        report(f"{name}.verdict_first_step", verdict(None if first is None else first <= TARGET_FIRST_STEP_S, label))
    report.finish()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
