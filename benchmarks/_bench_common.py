"""Shared pieces of the sd3tune benchmarks (bench_train.py, bench_generate.py).

Importable (``from _bench_common import ...`` with benchmarks/ on sys.path) and runnable, so that heavy work can go
to a fresh process whose memory is measured on its own:

  python benchmarks/_bench_common.py build-model OUT --size {tiny,deep,sd3m}
  python benchmarks/_bench_common.py anchor-train --model DIR --resolution 1024 --batch 1 --json OUT.json

``build-model`` writes a diffusers folder with RANDOM weights, fully offline: ``tiny`` is sd3tune's tiny SD3 (CPU
tests), ``deep`` the tiny SD3 with SD3 Medium's 24 transformer blocks (a CPU proxy for the GPU step at batch 1,
which is bound by launching SD3M's ~thousands of small ops from Python: same ops, tiny tensors), ``sd3m`` has SD3
Medium's real transformer (2.03 B parameters) and VAE, and text encoders with SD3 Medium's output widths but 2
layers (speed does not depend on the weights' values).

``anchor-train`` is the plain diffusers + peft LoRA loop that anchor_sd3m.py times (the anchor): the diffusers
dreambooth-lora-sd3 attention targets, rank 16, fp32 LoRA parameters, bf16 autocast, torch AdamW, latents and
text embeddings given (cached), no gradient checkpointing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from sd3tune.tiny import TINY_SIZES, RandomSd3Sizes, build_random_sd3, build_tiny_sd3

BENCHMARKS = Path(__file__).resolve().parent
NOT_ACCEPTANCE = "tiny/CPU: not an acceptance number"
GIB = 2**30

# The anchor's LoRA targets (diffusers' train_dreambooth_lora_sd3.py defaults; anchor_sd3m.py's training rows).
ANCHOR_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                  "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]

# stabilityai/stable-diffusion-3-medium-diffusers: transformer and VAE configs; the text encoders with the real
# output widths (CLIP-L, CLIP-G, T5-XXL) but 2 layers.
SD3M_SIZES = RandomSd3Sizes(
    clip_l=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768,
                hidden_act="quick_gelu"),
    clip_g=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, projection_dim=1280,
                hidden_act="gelu"),
    t5=dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64),
    transformer=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                     num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                     pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
    vae=dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
             up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
             latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
             use_quant_conv=False, use_post_quant_conv=False),
)

# The tiny model's widths with SD3 Medium's depth: every op of the SD3M step, on tiny tensors.
DEEP_SIZES = replace(TINY_SIZES, transformer={**TINY_SIZES.transformer,
                                              "num_layers": SD3M_SIZES.transformer["num_layers"]})
SIZES = ("tiny", "deep", "sd3m")
SIZE_NOTES = {"tiny": NOT_ACCEPTANCE,
              "deep": f"SD3M's 24 blocks at tiny width: a CPU proxy for launch-bound overhead; {NOT_ACCEPTANCE}",
              "sd3m": "SD3-Medium-sized random weights"}


def small(size: str) -> bool:
    """The CPU-sized models (tiny widths, 64 px; sd3tune's tiny-model settings apply)."""
    return size != "sd3m"


# ------------------------------------------------------------------------------------------------ environment

def offline_env() -> None:
    """Nothing a benchmark does may reach the Hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU (does not create a CUDA context in this process)."""
    import torch

    return torch.cuda.is_available()


def gpu_index() -> str:
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return first if first.isdigit() else "0"


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", gpu_index()],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    import torch

    return torch.cuda.get_device_name()


def device_label(cuda: bool) -> str:
    if cuda:
        return gpu_name()
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def resolve_size(size: str, cuda: bool) -> str:
    if size == "auto":
        return "sd3m" if cuda else "tiny"
    return size


def parse_variants(text: str, choices: Any) -> list[str]:
    """``--variants a,b``: the names, each one of ``choices``."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in choices]
    if unknown or not names:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(choices)}")
    return names


def start(bench: str, args: argparse.Namespace) -> tuple[bool, str, "Report"]:
    """What every benchmark does first: offline, ``--work`` created, device and model size resolved and reported.
    Returns (cuda, size, report)."""
    offline_env()
    args.work = args.work.expanduser().resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    cuda = cuda_available()
    size = resolve_size(args.size, cuda)
    report = Report(args.json)
    report("bench", bench)
    report("device", device_label(cuda))
    report("size", size, SIZE_NOTES[size])
    return cuda, size, report


def acceptance_label(cuda: bool, size: str, matches: bool, configuration: str) -> str:
    """"" when a run is an acceptance measurement (CUDA, SD3M size, the issue's configuration), else why not."""
    if not cuda or size != "sd3m":
        return NOT_ACCEPTANCE
    return "" if matches else f"not the acceptance configuration ({configuration})"


# ------------------------------------------------------------------------------------------------ memory

def _gpu_used_mib() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                              "-i", gpu_index()], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    try:
        return float(out.stdout.strip().splitlines()[0])
    except (ValueError, IndexError):
        return None


def _rss_bytes(which: str) -> float | None:
    import psutil

    me = psutil.Process()
    procs = me.children(recursive=True) if which == "children" else [me]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return float(total)


class PeakMemory:
    """Samples memory in a background thread while a phase runs.

    ``gpu``: memory in use on the GPU (nvidia-smi, whole device) above what was in use when sampling started, so it
    counts the CUDA context and the allocator's cache of whatever runs. ``children``: summed RSS of this process's
    subprocesses (accelerate + SimpleTuner, the anchor). ``self``: this process's RSS.
    """

    def __init__(self, kind: str, interval: float = 0.2) -> None:
        self.kind = kind
        self.interval = interval
        self.peak: float | None = None
        self.base = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> float | None:
        if self.kind == "gpu":
            mib = _gpu_used_mib()
            return None if mib is None else mib * 2**20
        return _rss_bytes(self.kind)

    def __enter__(self) -> "PeakMemory":
        if self.kind == "gpu":
            self.base = self._sample() or 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self._sample()
            if value is not None:
                self.peak = value if self.peak is None else max(self.peak, value)
            self._stop.wait(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def gib(self) -> float | None:
        return None if self.peak is None else round((self.peak - self.base) / GIB, 2)

    @property
    def how(self) -> str:
        return {"gpu": "nvidia-smi, whole GPU, above idle", "children": "RSS of the child processes",
                "self": "RSS of this process"}[self.kind]


# ------------------------------------------------------------------------------------------------ reporting

class Report:
    """Prints ``key: value`` lines as results arrive and keeps them for the final JSON line / file."""

    def __init__(self, json_path: Path | None = None) -> None:
        self.data: dict[str, Any] = {}
        self.json_path = json_path

    def __call__(self, key: str, value: Any, note: str = "") -> Any:
        self.data[key] = value
        print(f"{key}: {value}" + (f"  ({note})" if note else ""), flush=True)
        self.save()
        return value

    def save(self) -> None:
        if self.json_path is not None:
            self.json_path.parent.mkdir(parents=True, exist_ok=True)
            self.json_path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")

    def finish(self) -> None:
        self.save()
        print("RESULT " + json.dumps(self.data, default=str), flush=True)


def anchor_row(path: Path, row: str, metric: str, recipe: str, report: Report, extra: tuple[str, ...] = (),
               missing: str = "was anchor_sd3m.py run with --skip-gen or --skip-train?") -> float | None:
    """Report one row of benchmarks/anchor_sd3m.py's anchor.json (written in the same command, on the same machine)
    as ``anchor.<metric>``, with the card it ran on; None (and ``anchor.error``, ending with ``missing`` when the file
    has other rows) when the row is missing."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    if row not in data:
        why = missing if data else "no such file" if not path.is_file() else "it is empty"
        report("anchor.error", f"{path} has no {row} row ({why})")
        return None
    report("anchor.source", f"anchor_sd3m.py ({path}, row {row}): {recipe}")
    for key in ("gpu", "torch", "matmul_bf16_tflops", *extra):
        if key in data:
            report(f"anchor.{key}", data[key])
    return report(f"anchor.{metric}", data[row])


def ratio(value: float | None, anchor: float | None) -> float | None:
    if not value or not anchor:
        return None
    return round(value / anchor, 3)


def verdict(ok: bool | None, label: str = "") -> str:
    """PASS/FAIL against an acceptance target, or ``label`` when this run is not an acceptance measurement."""
    if label:
        return label
    if ok is None:
        return "n/a"
    return "PASS" if ok else "FAIL"


def median(values: list[float]) -> float:
    return statistics.median(values)


def run_self(args: list[str], timeout: float | None = None, log: Path | None = None) -> subprocess.CompletedProcess:
    """Run this file in a fresh interpreter (``build-model``, ``anchor-train``), output to ``log`` when given."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    if log is None:
        return subprocess.run(cmd, timeout=timeout, check=False)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        return subprocess.run(cmd, timeout=timeout, check=False, stdout=fh, stderr=subprocess.STDOUT)


# ------------------------------------------------------------------------------------------------ model + data

def model_for(work: Path, size: str, report: "Report") -> Path:
    """``ensure_model``, reported."""
    model, build_s, built = ensure_model(work, size)
    report("model", str(model))
    report("model_build_s", round(build_s, 1), "built now" if built else "reused from --work")
    return model


def ensure_model(work: Path, size: str) -> tuple[Path, float, bool]:
    """The random model folder for ``size`` under ``work`` (built in a subprocess once, then reused)."""
    folder = work / f"model-{size}"
    if (folder / "model_index.json").is_file():
        return folder, 0.0, False
    if folder.exists():
        shutil.rmtree(folder)
    t = time.perf_counter()
    log = work / f"build-model-{size}.log"
    proc = run_self(["build-model", str(folder), "--size", size], log=log)
    if proc.returncode != 0 or not (folder / "model_index.json").is_file():
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"building the {size} model failed (exit {proc.returncode}); log: {log}")
    return folder, time.perf_counter() - t, True


def build_model(out: Path, size: str) -> Path:
    offline_env()
    if size == "tiny":
        return build_tiny_sd3(out)
    if size == "deep":
        return build_random_sd3(out, DEEP_SIZES)
    import torch

    return build_random_sd3(out, SD3M_SIZES, device="cuda" if torch.cuda.is_available() else "cpu",
                            dtype=torch.bfloat16)


def ensure_data(work: Path, count: int, size: int) -> Path:
    """``count`` captioned synthetic images of ``size`` px (reused when already there)."""
    from sd3tune.tiny import make_concept_images

    folder = work / f"data-{count}x{size}"
    if len(list(folder.glob("*.png"))) != count:
        if folder.exists():
            shutil.rmtree(folder)
        make_concept_images(folder, count=count, size=size)
    return folder


# ------------------------------------------------------------------------------------------------ anchor: training

def anchor_train(model: Path, resolution: int, batch: int, rank: int, text_tokens: int, warmup: int, steps: int,
                 profile: str | None = None) -> dict[str, Any]:
    """The plain diffusers + peft LoRA step (anchor_sd3m.py's training anchor), timed in this process; ``profile``
    "N:FILE": then N more steps under step_profile.py, summary to FILE."""
    t_start = time.perf_counter()
    offline_env()
    import torch
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dt = torch.bfloat16 if cuda else torch.float32

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    torch.manual_seed(0)
    tr = SD3Transformer2DModel.from_pretrained(str(model), subfolder="transformer", dtype=dt).to(dev)
    tr.requires_grad_(False)
    tr.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=ANCHOR_TARGETS))
    params = [p for p in tr.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    cfg = tr.config
    lat = resolution // 8
    x = torch.randn(batch, cfg.in_channels, lat, lat, device=dev, dtype=dt)
    text = torch.randn(batch, text_tokens, cfg.joint_attention_dim, device=dev, dtype=dt)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, device=dev, dtype=dt)
    timesteps = torch.rand(batch, device=dev) * 1000
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
            out = tr(x, text, pooled, timesteps, return_dict=False)[0]
        loss = (out.float() - x.float()).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    sync()
    first = time.perf_counter() - t_start
    for _ in range(max(0, warmup - 1)):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - t
    if profile:
        import step_profile

        _, n, path = step_profile.parse_spec(f"1:{profile}")  # from the next step on, after the timed ones
        step_profile.install(1, n, path)
        for _ in range(n + 1):
            step()
    result: dict[str, Any] = {
        "s_per_step": round(seconds / steps, 4), "time_to_first_step_s": round(first, 1),
        "lora_params_M": round(sum(p.numel() for p in params) / 1e6, 2), "targets": len(ANCHOR_TARGETS),
        "rank": rank, "text_tokens": text_tokens, "resolution": resolution, "batch": batch,
        "dtype": str(dt).replace("torch.", ""), "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
    }
    if cuda:
        result["torch_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        result["torch_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-model", help="write a random diffusers SD3 folder")
    b.add_argument("out", type=Path)
    b.add_argument("--size", choices=SIZES, default="tiny")
    a = sub.add_parser("anchor-train", help="time the plain diffusers + peft LoRA step")
    a.add_argument("--model", type=Path, required=True)
    a.add_argument("--resolution", type=int, default=1024)
    a.add_argument("--batch", type=int, default=1)
    a.add_argument("--rank", type=int, default=16)
    a.add_argument("--text-tokens", type=int, default=154)
    a.add_argument("--warmup", type=int, default=3)
    a.add_argument("--steps", type=int, default=10)
    a.add_argument("--json", type=Path, required=True)
    a.add_argument("--profile", default=None, metavar="N:FILE",
                   help="after the timed steps, profile N more (step_profile.py), summary to FILE")
    args = ap.parse_args(argv)
    if args.cmd == "build-model":
        build_model(args.out, args.size)
        print(f"built {args.size} model in {args.out}")
        return 0
    result = anchor_train(args.model, args.resolution, args.batch, args.rank, args.text_tokens, args.warmup,
                          args.steps, args.profile)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(BENCHMARKS))
    raise SystemExit(main())
