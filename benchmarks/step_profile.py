"""Where a training step's time goes: a torch.profiler window over N optimizer steps of a running process.

Loaded into SimpleTuner's training process by ``bench_train.py --profile`` (through ``_profile_site``) or called by
``_bench_common.py anchor-train --profile``: :func:`install` registers a global optimizer-step hook that starts the
profiler after step ``start`` and stops it after step ``start + steps``, then writes one JSON summary:

  wall_s_per_step          time between the hooks (the profiler's own overhead included)
  gpu.busy_s_per_step      union of the GPU's kernel / memcpy / memset intervals: the GPU work of a step
  gpu.busy_fraction        busy / wall: near 1 = GPU-bound; well below 1 = the GPU waits for the CPU
  gpu.kernels_per_step     kernels launched per step (batch 1 at 1024 px is bound by launching these)
  gpu.top                  the kernels that take the most GPU time
  gpu.by_kind_ms_per_step  GPU time per kernel kind (attention, matmul, triton, conv, copy, elementwise, other)
  runtime                  CUDA runtime/driver calls on the CPU side (launches, synchronisations, copies)
  sync_wait_s_per_step     CPU time spent in calls that wait for the GPU (synchronize, device-to-host and pageable
                           copies)
  sync_sites               where the waits come from: the Python call sites of what torch.cuda.set_sync_debug_mode
                           flags (.item(), .tolist(), blocking copies, stream syncs; not torch.cuda.synchronize() or
                           the allocator's own cudaMalloc/cudaFree), per step and thread
  cpu_ops_per_step         aten ops dispatched per step, per thread (the CPU side of the launch bound)

On a CPU-only machine the GPU parts are empty and the rest still works (tests run it at tiny size).
Not part of the product: a benchmark aid, like the other scripts here.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import json
import os
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

ENV = "SD3TUNE_STEP_PROFILE"  # "START:STEPS:FILE"
TRACE_ENV = "SD3TUNE_STEP_PROFILE_TRACE"  # set: also write the whole trace, FILE.trace.json.gz (chrome://tracing)
GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
RUNTIME_CATEGORIES = {"cuda_runtime", "cuda_driver"}
# CPU-side calls that wait for the GPU: explicit synchronisation, and copies that block the host (the GPU copy they
# launch is device-to-host or from pageable memory; device-to-device and pinned copies return at once)
SYNCHRONIZE = "Synchronize"
MEMCPY = "Memcpy"
BLOCKING_COPY = ("DtoH", "Pageable")
SYNC_WARNING = "synchronizing CUDA operation"
OWN_SYNC = "sd3tune_step_profile_closing_sync"  # the profiler's own synchronize at the end, left out of the waits


def parse_spec(spec: str) -> tuple[int, int, Path]:
    start, steps, path = spec.split(":", 2)
    if int(start) < 1 or int(steps) < 1:
        raise ValueError(f"{ENV}={spec!r}: START and STEPS must be >= 1")
    return int(start), int(steps), Path(path)


def _union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length (s) of the union of [start, end) intervals given in microseconds."""
    total = 0.0
    end_so_far = None
    for start, end in sorted(intervals):
        if end_so_far is None or start > end_so_far:
            total += end - start
            end_so_far = end
        elif end > end_so_far:
            total += end - end_so_far
            end_so_far = end
    return total / 1e6


# What a GPU kernel does, from its name (first match wins): how a step's GPU time splits between attention, matmuls,
# compiled (Triton) kernels, convolutions, copies and PyTorch's own elementwise/reduction kernels.
KERNEL_KINDS = (("attention", ("sdpa", "flash", "fmha", "attention")),
                ("conv", ("conv", "implicit_gemm", "winograd", "nchwtonhwc", "nhwctonchw")),
                ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas")),
                ("triton", ("triton",)),
                ("copy", ("memcpy", "memset", "copy", "cat")),
                ("elementwise", ("elementwise", "reduce", "vectorized", "norm")))


def kernel_kind(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in lower for k in keys)), "other")


def _per_step(counter: dict[str, tuple[float, int]], steps: int, limit: int) -> list[list[Any]]:
    """[[name, ms per step, calls per step], ...] for the ``limit`` names with the most time."""
    rows = sorted(counter.items(), key=lambda kv: -kv[1][0])[:limit]
    return [[name[:120], round(us / 1e3 / steps, 3), round(n / steps, 1)] for name, (us, n) in rows]


def summarize_trace(trace: dict[str, Any], steps: int, wall_s: float) -> dict[str, Any]:
    """The summary of a Chrome trace (torch.profiler's ``export_chrome_trace``) covering ``steps`` steps."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    copies = {(e.get("args") or {}).get("correlation"): str(e.get("name", "")) for e in events
              if e.get("cat") == "gpu_memcpy"}
    own = [(e.get("tid"), float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in events
           if e.get("name") == OWN_SYNC]

    def waits(e: dict[str, Any], name: str) -> bool:
        if any(tid == e.get("tid") and start <= float(e["ts"]) <= end for tid, start, end in own):
            return False
        if SYNCHRONIZE in name:
            return True
        if MEMCPY not in name:
            return False
        copy = copies.get((e.get("args") or {}).get("correlation"))
        return copy is None or any(b in copy for b in BLOCKING_COPY)

    gpu: list[tuple[float, float]] = []
    kernels: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    runtime: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    ops_by_thread: collections.Counter[str] = collections.Counter()
    n_kernels = 0
    wait_us = 0.0
    for e in events:
        cat, name, dur = e.get("cat", ""), str(e.get("name", "")), float(e.get("dur", 0.0))
        if cat in GPU_CATEGORIES:
            gpu.append((float(e["ts"]), float(e["ts"]) + dur))
            kernels[name][0] += dur
            kernels[name][1] += 1
            n_kernels += cat == "kernel"
        elif cat in RUNTIME_CATEGORIES:
            runtime[name][0] += dur
            runtime[name][1] += 1
            if waits(e, name):
                wait_us += dur
        elif cat == "cpu_op":
            ops_by_thread[str(e.get("tid"))] += 1
    busy = _union_seconds(gpu)
    return {
        "steps": steps,
        "wall_s_per_step": round(wall_s / steps, 4),
        "gpu": {
            "busy_s_per_step": round(busy / steps, 4),
            "busy_fraction": round(busy / wall_s, 3) if wall_s > 0 and gpu else None,
            "kernels_per_step": round(n_kernels / steps, 1),
            "top": _per_step({k: (v[0], int(v[1])) for k, v in kernels.items()}, steps, 15),
            "by_kind_ms_per_step": _by_kind(kernels, steps),
        },
        "runtime": _per_step({k: (v[0], int(v[1])) for k, v in runtime.items()}, steps, 10),
        "sync_wait_s_per_step": round(wait_us / 1e6 / steps, 4),
        "cpu_ops_per_step": {tid: round(n / steps, 1) for tid, n in ops_by_thread.most_common()},
    }


def chrome_trace(profiler: Any) -> bytes:
    """A stopped torch.profiler's Chrome trace, as ``export_chrome_trace`` writes it (the input of summarize_trace)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        profiler.export_chrome_trace(str(path))
        return path.read_bytes()


def _by_kind(kernels: dict[str, list[float]], steps: int) -> dict[str, float]:
    """GPU milliseconds per step of each kernel kind (summed durations: overlapping kernels count twice), most first."""
    totals: collections.Counter[str] = collections.Counter()
    for name, (us, _) in kernels.items():
        totals[kernel_kind(name)] += us
    return {kind: round(us / 1e3 / steps, 3) for kind, us in totals.most_common()}


def _say(message: str) -> None:
    # a line of its own: SimpleTuner's progress bar leaves the current line open
    print(f"\nsd3tune step profile: {message}", flush=True)


class SyncSites:
    """Counts the Python call sites of synchronising CUDA calls (``torch.cuda.set_sync_debug_mode("warn")``)."""

    def __init__(self) -> None:
        self.sites: collections.Counter[str] = collections.Counter()
        self._saved: tuple[Any, int] | None = None  # our warnings filter entry, the sync debug mode before start()
        self._show: Any = warnings.showwarning  # where other warnings go (what showwarning was at start())

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        if SYNC_WARNING not in str(message):
            self._show(message, category, filename, lineno, file, line)
            return
        frames = [f for f in traceback.extract_stack()[:-1]
                  if f.filename != __file__ and "/torch/" not in f.filename and "/warnings.py" not in f.filename]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(frames[-3:]))
        self.sites[f"[{threading.current_thread().name}] {where}"] += 1

    def start(self) -> None:
        import torch

        if not torch.cuda.is_available():
            return
        self._show = warnings.showwarning
        warnings.filterwarnings("always", message=f".*{SYNC_WARNING}.*")
        self._saved = (warnings.filters[0], torch.cuda.get_sync_debug_mode())
        warnings.showwarning = self._record
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        """Undo start(): each step on its own, and never raise (the training goes on after the window)."""
        import torch

        if self._saved is None:
            return
        entry, mode = self._saved
        self._saved = None
        with contextlib.suppress(Exception):
            torch.cuda.set_sync_debug_mode(mode)
        if warnings.showwarning == self._record:  # (bound methods: equal, never identical)
            warnings.showwarning = self._show
        with contextlib.suppress(ValueError):
            warnings.filters.remove(entry)  # only our entry: filters added meanwhile by others stay
        with contextlib.suppress(Exception):
            getattr(warnings, "_filters_mutated", lambda: None)()  # drop the cached "always" decisions


class StepProfile:
    """Profile steps ``start + 1 .. start + steps`` (counted by optimizer steps) and write the summary to ``out``."""

    def __init__(self, start: int, steps: int, out: Path) -> None:
        self.start, self.steps, self.out = start, steps, out
        self.seen = 0
        self.profiler = None
        self.sync_sites = SyncSites()
        self.t0 = 0.0
        self.main = threading.main_thread()
        self.handle: Any = None  # the optimizer-step hook, removed once the window is written

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def on_step(self, *_: Any) -> None:
        if threading.current_thread() is not self.main:
            return
        self.seen += 1
        try:
            if self.seen == self.start:
                self._begin()
            elif self.seen == self.start + self.steps and self.profiler is not None:
                self._end()
        except Exception as exc:  # a benchmark aid must never end the training it watches
            self._abandon(f"{type(exc).__name__}: {exc}")

    def _abandon(self, error: str) -> None:
        self.sync_sites.stop()
        if self.profiler is not None:
            with contextlib.suppress(Exception):
                self.profiler.stop()
            self.profiler = None
        self.remove()
        with contextlib.suppress(Exception):
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps({"error": error}) + "\n")
        _say(f"failed: {error}")

    def _begin(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.profiler = profile(activities=activities)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.profiler.start()
        self.sync_sites.start()
        self.t0 = time.perf_counter()

    def _end(self) -> None:
        import torch

        self.sync_sites.stop()
        if torch.cuda.is_available():  # the window ends when its GPU work does; this wait is not the training's
            with torch.profiler.record_function(OWN_SYNC):
                torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        assert self.profiler is not None
        self.profiler.stop()
        raw = chrome_trace(self.profiler)
        summary = summarize_trace(json.loads(raw), self.steps, wall)
        summary["sync_sites"] = [[where, round(n / self.steps, 2)] for where, n in self.sync_sites.sites.most_common(20)]
        summary["after_step"] = self.start
        summary["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        if torch.cuda.is_available() and not summary["gpu"]["top"]:
            summary["warning"] = "CUDA is in use but the profiler recorded no GPU activity (is CUPTI missing?)"
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(summary, indent=1) + "\n")
        if os.environ.get(TRACE_ENV):
            self.out.with_suffix(".trace.json.gz").write_bytes(gzip.compress(raw))
        self.profiler = None
        self.remove()
        _say(f"wrote {self.out}")


def install(start: int, steps: int, out: Path) -> StepProfile:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    prof = StepProfile(start, steps, out)
    prof.handle = register_optimizer_step_post_hook(prof.on_step)
    return prof


def install_from_env() -> StepProfile | None:
    spec = os.environ.get(ENV)
    return install(*parse_spec(spec)) if spec else None
