#!/usr/bin/env python
"""Time `sd3tune generate` (one load, batched seeds, batched CFG, optional per-block compile) against a plain
diffusers StableDiffusion3Pipeline (eager, one image per call), in the same process on the same machine.

On a CUDA host: an SD3-Medium-sized model with random weights (no download; cached in --work), 1024x1024, 28 steps,
CFG 7, T5 length 256. Without a GPU: the tiny random SD3 at 64 px, so CI keeps the script working (numbers labelled
"tiny/CPU: not an acceptance number"). Printed per variant:

  s_per_image            steady state: images after the first batch, each counted when its PNG is on disk (the
                         writer thread encodes a batch while the GPU makes the next one)
  time_to_first_image_s  from the call to the first image written (loading, compiling, first batch)
  peak_mem_gib           torch's peak allocated GPU memory in that phase (CPU: this process's RSS)
  ratio_s_per_image      s_per_image / anchor's

Variants (--variants): default (`sd3tune generate` as shipped), compile (`--compile`: LoRA fused, per-block
torch.compile of the transformer and the VAE decoder compiled; ignored with a note on CPU), fp8 (`--fp8`: compile
with the blocks' matmuls in FP8; sm89+ GPUs with bf16, and CPU), and candidates not yet in `generate --compile`:
compile-qkv (compile plus each joint attention's q/k/v computed by one matmul per stream; see fuse_qkv; applied on
CPU too, so CI checks its images) and compile-autotune (the blocks compiled with max-autotune; CUDA only). Each
variant but default also reports how far its
images are from default's, and fp8 and the candidates how far from compile's, at the same seeds (mean |pixel
difference| out of 255).
Target on an H100-class card (H100, H200, H800, GH200): <= 1.1 s per 1024x1024 image.

--anchor-json FILE takes the anchor from benchmarks/anchor_sd3m.py's anchor.json (its
gen_1024_28steps_cfg_s row), written by that script earlier in the same command on the same machine, instead
of timing the plain pipeline here. sd3tune then runs as many denoising steps as that anchor did unless --steps says
otherwise: 28, or 2 when anchor_sd3m.py ran with --tiny (its row keeps its name); a different --steps prints no
ratio. Without --anchor-json both sides run --steps (default 28).

examples:
  python benchmarks/bench_generate.py                               # CPU: tiny; CUDA: SD3M size, default + compile
  python benchmarks/bench_generate.py --images 24 --batch-size 4 --json /tmp/gen.json
  python benchmarks/bench_generate.py --lora /tmp/sd3tune-bench/runs/default  # with the LoRA bench_train trained
  python benchmarks/bench_generate.py --variants compile --profile           # where a compiled image's GPU time goes
  python benchmarks/anchor_sd3m.py --out /tmp && python benchmarks/bench_generate.py --anchor-json /tmp/anchor.json
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (SIZES, PeakMemory, Report, acceptance_label, anchor_row, median,  # noqa: E402
                           model_for, parse_variants, ratio, start, verdict)

from sd3tune.sheets import mean_abs_diff  # noqa: E402

TARGET_S_PER_IMAGE = 1.1  # on an H100-class (Hopper) card
HOPPER = ("H100", "H200", "H800", "GH200")
VARIANTS = ("default", "compile", "fp8", "compile-qkv", "compile-autotune")
# benchmarks/anchor_sd3m.py's denoising steps: 28, or 2 with --tiny (its CPU run, the only one that logs no "gpu")
ANCHOR_SD3M_STEPS = 28
ANCHOR_SD3M_TINY_STEPS = 2
QK_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")  # SD3.5's q/k normalisation: not SD3 Medium's
PROMPTS = ["concept art of a castle on a hill, warm light", "a robot in a desert city, concept art",
           "a lighthouse at dusk, oil painting", "a spaceship over a forest, concept art"]


def fuse_qkv(transformer: Any) -> int:
    """The compile-qkv candidate: each SD3 joint attention computes the image stream's q, k, v with one matmul and the
    text stream's with another (diffusers' ``Attention.fuse_projections`` + ``FusedJointAttnProcessor2_0``): two GEMMs
    per block instead of six, each input read once. (The q/k/v concatenations and the attention output's copy stay:
    with a batch of more than one, the image and text parts are not contiguous in either processor. Keeping the
    activations token-major instead, so that nothing is copied, measured no faster than --compile: README.md.)
    Only where that processor computes what diffusers' default one does: joint attention without q/k normalisation
    (SD3 Medium; SD3.5 normalises q/k and is left as is). Returns how many attention layers were fused."""
    from diffusers.models.attention_processor import FusedJointAttnProcessor2_0, JointAttnProcessor2_0

    fused = 0
    for block in getattr(transformer, "transformer_blocks", []):
        attn = block.attn
        if type(attn.processor) is JointAttnProcessor2_0 and all(getattr(attn, n, None) is None for n in QK_NORMS):
            attn.fuse_projections()
            attn.set_processor(FusedJointAttnProcessor2_0())
            fused += 1
    return fused


def autotune_blocks(transformer: Any) -> int:
    """The compile-autotune candidate: the blocks compiled with ``mode="max-autotune-no-cudagraphs"`` (Inductor
    benchmarks Triton GEMM templates against cuBLAS per shape and tunes its pointwise kernels). The whole
    transformer so compiled was a little faster than per-block default compile, after minutes of compiling
    (README.md); per block, the 24 identical blocks share one set of shapes, so the autotuning happens once. CUDA
    only (``generate --compile`` compiles nothing on CPU either); returns how many blocks."""
    from sd3tune.inference import compile_blocks

    if next(transformer.parameters()).device.type != "cuda":
        return 0
    return compile_blocks(transformer, mode="max-autotune-no-cudagraphs")


CANDIDATES = {  # variant -> (what it adds to generate --compile's fast path, its note)
    "compile-qkv": (fuse_qkv, "q/k/v fused into one matmul per stream in {} attention layers"),
    "compile-autotune": (autotune_blocks, "{} blocks compiled with max-autotune-no-cudagraphs"),
}


@contextmanager
def candidate(name: str) -> Iterator[None]:
    """While a candidate variant runs, ``Pipeline.fast_path`` (what `generate --compile` calls) also applies the
    candidate; compiling is lazy, so the compiled blocks see it. Nothing changes for default and compile."""
    from sd3tune.inference import Pipeline

    if name not in CANDIDATES:
        yield
        return
    apply, note = CANDIDATES[name]
    shipped = Pipeline.fast_path

    def fast_path(self: Pipeline, *args: Any, **kwargs: Any) -> list[str]:  # the shipped one's arguments, passed on
        return [*shipped(self, *args, **kwargs), "candidate: " + note.format(apply(self.pipe.transformer))]

    Pipeline.fast_path = fast_path
    try:
        yield
    finally:
        Pipeline.fast_path = shipped


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["auto", *SIZES], default="auto",
                    help="model size: auto = sd3m on CUDA, tiny on CPU; deep = tiny widths, SD3M's 24 blocks")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sd3tune-bench"), help="where the random model is cached")
    ap.add_argument("--variants", default=None, help=f"comma-separated, from {', '.join(VARIANTS)} (CUDA default: "
                                                     "default,compile; CPU: default)")
    ap.add_argument("--images", type=int, default=None, help="images per sd3tune variant (sd3m 12, tiny 6); the "
                                                             "first batch is warm-up")
    ap.add_argument("--batch-size", type=int, default=None, help="sd3tune generate --batch-size (sd3m 4, tiny 2)")
    ap.add_argument("--anchor-images", type=int, default=None, help="timed anchor images after one warm-up "
                                                                    "(sd3m 3, tiny 2)")
    ap.add_argument("--steps", type=int, default=None,
                    help="denoising steps, both sides (default 28; with --anchor-json, as many as that anchor ran: "
                         f"{ANCHOR_SD3M_TINY_STEPS} for anchor_sd3m.py --tiny)")
    ap.add_argument("--guidance", type=float, default=7.0)
    ap.add_argument("--resolution", type=int, default=None, help="pixels (sd3m 1024, tiny 64)")
    ap.add_argument("--max-sequence-length", type=int, default=256, help="T5 tokens, the same for both")
    ap.add_argument("--lora", type=Path, default=None, help="a LoRA (run folder or .safetensors) for both sides")
    ap.add_argument("--anchor-json", type=Path, default=None,
                    help="anchor_sd3m.py's anchor.json from the same command: use its generation row as the anchor")
    ap.add_argument("--profile", action="store_true",
                    help="after each variant's timed run, load it again and profile one warm batch with torch.profiler "
                         "(CUDA: GPU time per image by kernel kind, top kernels; summary in WORK/profiles/)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    return ap.parse_args(argv)


class Phase:
    """Peak memory of one phase: torch's allocator on CUDA, this process's RSS on CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.poller = None if cuda else PeakMemory("self")

    def __enter__(self) -> "Phase":
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.poller.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.poller is not None:
            self.poller.__exit__(*exc)

    @property
    def gib(self) -> float | None:
        import torch

        if self.cuda:
            return round(torch.cuda.max_memory_allocated() / 2**30, 2)
        return self.poller.gib

    @property
    def how(self) -> str:
        return "torch peak allocated" if self.cuda else "RSS of this process"


def sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def anchor_json_steps(path: Path) -> int | None:
    """How many denoising steps anchor_sd3m.py's generation row in ``path`` took (None: no such row)."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    if "gen_1024_28steps_cfg_s" not in data:
        return None
    return ANCHOR_SD3M_STEPS if "gpu" in data else ANCHOR_SD3M_TINY_STEPS


def run_anchor(args: argparse.Namespace, model: Path, res: int, cuda: bool, report: Report) -> float | None:
    """Plain diffusers: load, then one pipeline call per image (eager, CFG batched by diffusers)."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    from sd3tune.runtime import quiet_libraries

    quiet_libraries()
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    n = args.anchor_images or (3 if cuda else 2)
    with Phase(cuda) as phase:
        t0 = time.perf_counter()
        pipe = StableDiffusion3Pipeline.from_pretrained(str(model), dtype=dtype)
        if args.lora is not None:
            from sd3tune.lora import resolve_lora

            lora = resolve_lora(args.lora)
            pipe.load_lora_weights(str(lora.file.parent), weight_name=lora.file.name, adapter_name="bench")
        pipe.to(dev)
        pipe.set_progress_bar_config(disable=True)
        load_s = time.perf_counter() - t0

        def one(i: int):
            gen = torch.Generator(dev).manual_seed(i)
            with torch.inference_mode():
                return pipe(prompt=PROMPTS[i % len(PROMPTS)], generator=gen, num_inference_steps=args.steps,
                            guidance_scale=args.guidance, width=res, height=res,
                            max_sequence_length=args.max_sequence_length, output_type="pil").images[0]

        one(0)
        sync(cuda)
        first = time.perf_counter() - t0
        times = []
        for i in range(1, n + 1):
            sync(cuda)
            t = time.perf_counter()
            one(i)
            sync(cuda)
            times.append(time.perf_counter() - t)
    report("anchor.source", "diffusers StableDiffusion3Pipeline, eager, one image per call, PIL output (no PNG)")
    report("anchor.steps", args.steps)
    report("anchor.load_s", round(load_s, 1))
    report("anchor.time_to_first_image_s", round(first, 1))
    report("anchor.peak_mem_gib", phase.gib, phase.how)  # the pipeline is freed on return; Phase clears the cache
    return report("anchor.s_per_image", round(median(times), 4), f"median of {n}")


def run_variant(name: str, args: argparse.Namespace, model: Path, res: int, cuda: bool, out: Path,
                report: Report) -> dict[str, Any]:
    from sd3tune.commands.generate import GenerateOptions, run_generate

    n = args.images or (12 if cuda else 6)
    bs = args.batch_size or (4 if cuda else 2)
    if n <= bs:
        raise SystemExit(f"--images {n} must exceed --batch-size {bs}: the first batch is the warm-up")
    arrivals: list[float] = []
    opts = GenerateOptions(prompts=[PROMPTS[0]], model=str(model), lora=args.lora, num_images=n, batch_size=bs,
                           steps=args.steps, guidance=args.guidance, width=res, height=res,
                           max_sequence_length=args.max_sequence_length, out=out / name,
                           compile=name != "default", fp8=name == "fp8")
    import torch

    # As in a fresh `sd3tune generate` process: no graph compiled for an earlier variant (all of them compile
    # Module._call_impl, whose cache holds 8 graphs before torch.compile falls back to eager).
    torch._dynamo.reset()
    with Phase(cuda) as phase, candidate(name):
        t0 = time.perf_counter()
        result = run_generate(opts, on_image=lambda _img: arrivals.append(time.perf_counter() - t0), progress=False)
    p = f"{name}."
    report(p + "notes", result.notes)
    report(p + "steps", args.steps)
    report(p + "images", f"{n} in batches of {bs} (CFG batch {2 * bs})")
    report(p + "load_s", round(result.load_seconds, 1))
    first = report(p + "time_to_first_image_s", round(arrivals[0], 1))
    # Per-image time of each batch after the first (a batch's images arrive together), median over batches.
    ends = [arrivals[min(i + bs, n) - 1] for i in range(0, n, bs)]
    sizes = [min(bs, n - i) for i in range(0, n, bs)]
    per_image = [(ends[k] - ends[k - 1]) / sizes[k] for k in range(1, len(ends))]
    s_per_image = median(per_image)
    report(p + "first_batch_s", round(ends[0] - result.load_seconds, 1), "includes any compile")
    report(p + "peak_mem_gib", phase.gib, phase.how)
    # Encoding a PNG with provenance, alone: the writer thread does this for every image while the GPU makes the next
    # batch, so it reaches s_per_image only if a batch's PNGs take longer than a batch.
    from PIL import Image

    from sd3tune.inference import png_metadata

    image = Image.open(result.images[-1].path).convert("RGB")
    t = time.perf_counter()
    image.save(io.BytesIO(), format="PNG", pnginfo=png_metadata({"prompt": PROMPTS[0], "seed": 0}))
    png_s = report(p + "png_write_s", round(time.perf_counter() - t, 4), "one image, on the writer thread")
    if png_s > s_per_image:
        report(p + "png_bound", True, "the writer thread, not the GPU, sets s_per_image")
    return {"s_per_image": report(p + "s_per_image", round(s_per_image, 4),
                                  f"median over batches 2..{len(ends)}, images {bs + 1}..{n}"),
            "time_to_first_image_s": first, "images": [i.path for i in result.images]}


def profile_variant(name: str, args: argparse.Namespace, model: Path, res: int, cuda: bool, report: Report) -> None:
    """One batch of ``name`` as `sd3tune generate` makes it (same load, LoRA, fast path and sampler settings), after a
    warm-up batch, under torch.profiler; per image: wall time, GPU busy time, GPU time by kernel kind, top kernels."""
    import torch
    from step_profile import chrome_trace, summarize_trace
    from torch.profiler import ProfilerActivity, profile

    from sd3tune.inference import load_pipeline, make_images
    from sd3tune.lora import resolve_lora
    from sd3tune.sampling import SamplerSettings

    bs = args.batch_size or (4 if cuda else 2)
    pipe = load_pipeline(str(model), lora=resolve_lora(args.lora) if args.lora is not None else None)
    pipe.set_lora_scale(1.0)
    if name != "default":
        with candidate(name):
            pipe.fast_path(fp8=name == "fp8")
    settings = SamplerSettings(steps=args.steps, guidance=args.guidance, width=res, height=res,
                               max_sequence_length=args.max_sequence_length)
    seeds = list(range(bs))
    make_images(pipe, PROMPTS[0], seeds, settings).pil(bs - 1)  # warm-up: compiles, encodes the prompt
    sync(cuda)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t = time.perf_counter()
        make_images(pipe, PROMPTS[0], seeds, settings).pil(bs - 1)
        sync(cuda)
        wall = time.perf_counter() - t
    summary = summarize_trace(json.loads(chrome_trace(prof)), bs, wall)
    path = args.work / "profiles" / f"generate-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + "\n")
    gpu, p = summary["gpu"], f"{name}.profile_"
    report(p + "summary", str(path))
    report(p + "wall_s_per_image", summary["wall_s_per_step"], f"one warm batch of {bs}, slowed by the profiler")
    report(p + "gpu_busy_s_per_image", gpu["busy_s_per_step"],
           f"GPU busy fraction {gpu['busy_fraction']}, {gpu['kernels_per_step']} kernels per image")
    report(p + "gpu_ms_per_image_by_kind", gpu["by_kind_ms_per_step"])
    report(p + "top_kernels", gpu["top"][:8], "[kernel, ms per image, calls per image]")
    del pipe
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda, size, report = start("generate", args)
    if size == "sd3m" and not cuda:
        print("note: SD3M size on CPU is very slow (minutes per image)", flush=True)
    names = parse_variants(args.variants or ("default,compile" if cuda else "default"), VARIANTS)
    res = args.resolution or (1024 if size == "sd3m" else 64)
    anchor_steps = anchor_json_steps(args.anchor_json) if args.anchor_json else None
    args.steps = args.steps or anchor_steps or ANCHOR_SD3M_STEPS  # both sides run the anchor's steps
    model = model_for(args.work, size, report)
    report("config", {"resolution": res, "steps": args.steps, "guidance": args.guidance,
                      "max_sequence_length": args.max_sequence_length, "lora": str(args.lora) if args.lora else None})
    import torch

    report("torch", torch.__version__)
    if args.anchor_json:
        anchor = anchor_row(args.anchor_json, "gen_1024_28steps_cfg_s", "s_per_image",
                            "diffusers StableDiffusion3Pipeline, eager, prompt embeddings given, 1024 px, 28 steps, "
                            "CFG batch 2, PIL output, median of 3 (--tiny: 64 px, 2 steps, 1 image)", report,
                            ("gen_transformer_only_s", "vae_decode_s", "gen_peak_gib"))
        if anchor_steps is not None:
            report("anchor.steps", anchor_steps, "anchor_sd3m.py --tiny" if anchor_steps == ANCHOR_SD3M_TINY_STEPS
                   else "anchor_sd3m.py")
    else:
        anchor = run_anchor(args, model, res, cuda, report)
    label = acceptance_label(cuda, size, res == 1024 and args.steps == 28, "1024 px, 28 steps")
    unlike = (f"no ratio: the anchor ran {anchor_steps} denoising steps, sd3tune --steps {args.steps}"
              if anchor_steps is not None and anchor_steps != args.steps else "")
    hopper = any(name in report.data["device"] for name in HOPPER)
    failed = False
    with tempfile.TemporaryDirectory(dir=args.work) as td:
        made: dict[str, list[Path]] = {}
        for name in names:
            try:
                out = run_variant(name, args, model, res, cuda, Path(td), report)
            except Exception as exc:  # a candidate that fails on this machine must not cost the variants after it
                traceback.print_exc()
                first_line = (str(exc).strip().splitlines() or [""])[0]
                report(f"{name}.error", f"{type(exc).__name__}: {first_line}")
                failed = True
                continue
            if args.profile:
                profile_variant(name, args, model, res, cuda, report)
            made[name] = out["images"]
            for other in ("default", "compile"):  # how far from the images of generate and of generate --compile
                if name not in ("default", other) and other in made:
                    report(f"{name}.mean_abs_diff_vs_{other}", round(mean_abs_diff(made[other], out["images"]), 3),
                           "same seeds; 0..255")
            report(f"{name}.ratio_s_per_image", None if unlike else ratio(out["s_per_image"], anchor),
                   unlike or label or "sd3tune / anchor")
            if label:
                report(f"{name}.verdict", verdict(None, label))
            elif hopper:
                report(f"{name}.verdict", verdict(out["s_per_image"] <= TARGET_S_PER_IMAGE),
                       f"target <= {TARGET_S_PER_IMAGE} s/image on an H100-class card")
            else:
                report(f"{name}.verdict", "n/a: the 1.1 s/image target is for an H100-class card; compare the ratio")
    report.finish()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
