"""SD3 (+ LoRA) inference through diffusers: loading the pipeline with a LoRA, train/inference parity, deterministic
seeds, the fast path, PNG provenance. Used by `sd3tune generate`, `quickstart` and `evaluate`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from sd3tune import __version__
from sd3tune.defaults import SD3M
from sd3tune.errors import Sd3tuneError
from sd3tune.findings import plural
from sd3tune.fsutil import model_folder
from sd3tune.hub import model_files_only
from sd3tune.lora import LoraSource, check_lora_fits
from sd3tune.runtime import pick_device, pick_dtype, quiet_libraries
from sd3tune.sampling import DIFFUSERS_T5_DEFAULT, T5_MAX_TOKENS, SamplerSettings

# generate --compile's one-off compile against what it saves per image, at 1024 px in batches of 4: it pays off from
# ~45 images (measured: benchmarks/README.md)
COMPILE_PAYS_OFF = 45


def load_adapter(pipe: Any, file: Path, name: str) -> None:
    """Load a LoRA file into the pipeline as adapter ``name``, after checking it fits this transformer."""
    import warnings

    check_lora_fits(file, pipe.transformer)
    with warnings.catch_warnings():  # peft warns when a second adapter joins the first: intended (evaluate)
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)


@dataclass
class Pipeline:
    """A loaded StableDiffusion3Pipeline plus what generate needs to know about it."""

    pipe: Any
    model: str
    device: str
    dtype: Any
    lora: LoraSource | None = None
    adapter: str | None = None
    fused: bool = False  # the LoRA is folded into the weights (fast_path); its scale is fixed
    fp8: bool = False  # the blocks' matmuls run in FP8 (fast_path(fp8=True))
    compiled: bool = False  # the blocks and the VAE decoder are compiled (fast_path on CUDA)
    offload: str = "none"
    _embeddings: dict = field(default_factory=dict, repr=False)

    def prompt_embeddings(self, prompt: str, s: SamplerSettings, n: int) -> dict[str, Any]:
        """The pipeline's text embeddings (and the negative's) for ``n`` images of ``prompt``, as ``pipe(...)``
        keyword arguments. Encoded once per prompt and reused by its later batches: otherwise the three text
        encoders run for the prompt and the negative in every batch (a few per cent of a compiled batch:
        benchmarks/README.md). The same tensors the pipeline would compute, so the same images."""
        length = self.t5_length(s)
        key = (prompt, s.negative or "", length, s.guidance > 1)
        if key not in self._embeddings:
            import torch

            with torch.inference_mode():
                embeds = self.pipe.encode_prompt(
                    prompt=prompt, prompt_2=None, prompt_3=None, negative_prompt=s.negative or None,
                    do_classifier_free_guidance=s.guidance > 1, num_images_per_prompt=1,
                    max_sequence_length=length, device=self.pipe._execution_device)
            self._embeddings = {key: embeds}  # the latest prompt only: generate and evaluate go prompt by prompt
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        return {name: None if t is None else t.repeat(n, *[1] * (t.dim() - 1))
                for name, t in zip(names, self._embeddings[key])}

    def truncation_notes(self, prompts: Sequence[str], s: SamplerSettings) -> list[str]:
        """Notes on prompts longer than the text encoders read: the pipeline cuts them silently (CLIP at its 77
        tokens, T5 at the T5 length), so the end of such a prompt has no effect on the image."""
        notes = []
        encoders = [("CLIP", getattr(self.pipe, "tokenizer", None), None)]
        if self.pipe.text_encoder_3 is not None:
            encoders.append(("T5", getattr(self.pipe, "tokenizer_3", None), self.t5_length(s)))
        for name, tokenizer, limit in encoders:
            if tokenizer is None:
                continue
            limit = limit or tokenizer.model_max_length
            long = [p for p in dict.fromkeys(prompts) if len(tokenizer(p).input_ids) > limit]
            if long:
                more = (f"; --max-sequence-length raises it ({T5_MAX_TOKENS} at most)"
                        if name == "T5" and limit < T5_MAX_TOKENS else "")
                notes.append(f"{plural(len(long), 'prompt')} longer than the {limit} tokens {name} reads: the rest "
                             f"of {'it' if len(long) == 1 else 'each'} is cut off for {name}{more}")
        return notes

    def t5_length(self, s: SamplerSettings) -> int:
        """The T5 tokens of the text embeddings: without T5 (``--drop-t5``) the pipeline pads its T5 part with zeros
        to its own default length, whatever ``max_sequence_length`` says."""
        return s.max_sequence_length if self.pipe.text_encoder_3 is not None else DIFFUSERS_T5_DEFAULT

    def set_lora_scale(self, scale: float, adapter: str | None = None) -> float:
        """Make ``adapter`` (default: the run's LoRA) the active one at strength ``scale`` times the run's alpha/rank
        (as training applied it); returns that strength: the factor on the LoRA's ``B @ A``. peft already scales an
        adapter by its config's lora_alpha / r (not 1 when the file carried its peft config, as SimpleTuner's
        checkpoints do), so the adapter weight is the strength divided by that."""
        if self.fused:
            raise RuntimeError("the LoRA is fused into the weights; its scale can no longer change")
        adapter = adapter or self.adapter
        self._embeddings.clear()  # a LoRA may reach the text encoders too
        if self.lora is None or adapter is None:
            return 0.0
        strength = scale * self.lora.alpha_over_rank
        peft = self.pipe.transformer.peft_config[adapter]
        self.pipe.set_adapters([adapter], adapter_weights=[strength * peft.r / peft.lora_alpha])
        return strength

    def fast_path(self, images: int | None = None, fp8: bool = False) -> list[str]:
        """Speed for many images at one LoRA scale (``generate --compile``): fold the LoRA, at the scale set, into
        the transformer's weights and drop the adapter layers (no LoRA matmuls per step); with ``fp8`` (``--fp8``)
        turn the blocks' matmuls into FP8 ones (sd3tune.fp8; on the CPU too); then (CUDA) fuse each bf16
        feed-forward's GELU into its matmul and compile every transformer block and the VAE decoder (the VAE decodes
        one image at a time, so one graph serves any batch size). Call after ``set_lora_scale``; returns
        notes for the user (``images``: how many will be made, for the note when compiling does not pay off).

        Measured with benchmarks/bench_generate.py against the plain diffusers pipeline in the same command (the
        timings, with and without each part: benchmarks/README.md)."""
        if self.offload != "none":
            flags = "--compile and --fp8" if fp8 else "--compile"
            return [f"{flags} ignored with --offload: CPU offload hooks and fused/compiled blocks do not mix"]
        notes = []
        if self.adapter is not None:
            self.pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=[self.adapter])
            self.pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
            self.adapter = None
            self.fused = True
            notes.append("LoRA fused into the transformer weights")
        if fp8:
            from sd3tune.fp8 import quantize_blocks

            layers = quantize_blocks(self.pipe.transformer)
            self.fp8 = True
            notes.append(f"--fp8: {layers} transformer matmuls in FP8 (e4m3, row-wise scales); images differ slightly "
                         "from those without --fp8")
        if self.device != "cuda":
            notes.append(f"--compile: nothing compiled on {self.device} (only pays off on a CUDA GPU)")
            return notes
        fuse_gelu_epilogues(self.pipe.transformer)  # skips the layers --fp8 made FP8
        compile_blocks(self.pipe.transformer)
        self.pipe.vae.enable_slicing()  # decode one image at a time: one compiled graph for any batch size
        self.pipe.vae.decoder.compile(dynamic=False)
        self.compiled = True
        what = "matmuls in FP8" if fp8 else "feed-forward GELUs fused into their matmuls"
        notes.append(f"transformer blocks ({what}) and VAE decoder compiled: the first batch takes ~15-25 s longer, "
                     "later images ~30% less")
        if images is not None and images < COMPILE_PAYS_OFF:
            notes.append(f"--compile for {plural(images, 'image')}: at 1024 px compiling (~15 s) pays off from "
                         f"~{COMPILE_PAYS_OFF} images")
        return notes


def load_pipeline(model: str, device: str = "auto", dtype: str = "auto", lora: LoraSource | None = None,
                  drop_t5: bool = False, offload: Literal["none", "model", "sequential"] = "none",
                  shift: float | None = None) -> Pipeline:
    """Load the pipeline (and LoRA) once; ``Pipeline.fast_path`` then fuses and compiles it for many images."""
    local = model_folder(model)
    if local is not None and not local.exists():
        raise Sd3tuneError(f"model folder {model} does not exist",
                           hint="pass an SD3 diffusers folder or the Hub id " + SD3M)
    if local is not None and not (local / "model_index.json").is_file():
        raise Sd3tuneError(f"{model} is not a diffusers model folder (no model_index.json)",
                           hint="pass an SD3 diffusers folder or the Hub id " + SD3M)
    local_only = local is None and model_files_only(model, "pass --model PATH to a local diffusers folder")
    dev = pick_device(device)
    if offload != "none" and dev != "cuda":
        raise Sd3tuneError(f"--offload {offload} needs a CUDA GPU (it moves the model between GPU and CPU memory); "
                           f"this runs on {dev}", hint="drop --offload")
    torch_dtype = pick_dtype(dtype, dev)
    quiet_libraries()  # first: before diffusers' import
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": local_only}
    if drop_t5:
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(str(local) if local is not None else model, **kwargs)
    except OSError as exc:
        raise Sd3tuneError(f"cannot load {model}: {str(exc).splitlines()[0]}",
                           hint="check the id/path; gated Hub models need `hf auth login` and accepted terms") from None
    if shift is not None and getattr(pipe.scheduler.config, "shift", None) != shift:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=shift)
    adapter = None
    if lora is not None:
        adapter = "sd3tune"
        load_adapter(pipe, lora.file, adapter)
    if offload == "model":
        pipe.enable_model_cpu_offload()
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload()
    else:
        pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    return Pipeline(pipe, model, dev, torch_dtype, lora, adapter, offload=offload)


def compile_blocks(transformer: Any, mode: str | None = None) -> int:
    """Regional compilation: ``torch.compile`` each transformer block in place (``mode``: torch.compile's). The
    identical blocks share one compiled graph, so compiling costs seconds instead of minutes for the whole model
    (benchmarks/README.md). It happens lazily on the first call; each new batch size compiles once more (static
    shapes)."""
    blocks = getattr(transformer, "transformer_blocks", None) or []
    for block in blocks:
        block.compile(dynamic=False, mode=mode)
    return len(blocks)


def fuse_gelu_epilogues(transformer: Any) -> int:
    """On CUDA, compute each feed-forward's first linear layer and its tanh-GELU as one cuBLASLt matmul with a GELU
    epilogue (``torch._addmm_activation``, whose CUDA GELU is the tanh approximation SD3 uses; its CPU kernel uses
    the exact GELU, so CPU tensors take diffusers' own path). Unfused, the 6144-wide activation is written by the
    matmul, read and written again by the GELU: ~0.8 GB of memory traffic per block and step at a CFG batch of 8 at
    1024 px (what it saves: benchmarks/bench_feedforward.py, benchmarks/README.md). Layers
    already FP8 (sd3tune.fp8) are left alone. For inference; returns how many layers now take the fused path."""
    import types

    import torch
    from diffusers.models.activations import GELU

    fused = 0
    for module in transformer.modules():
        if (type(module) is GELU and module.approximate == "tanh" and type(module.proj) is torch.nn.Linear
                and module.proj.bias is not None):
            module.forward = types.MethodType(_linear_gelu_tanh, module)
            fused += 1
    return fused


def _linear_gelu_tanh(self: Any, x: Any) -> Any:
    import torch

    proj = self.proj
    if not x.is_cuda:
        return torch.nn.functional.gelu(proj(x), approximate="tanh")
    y = torch._addmm_activation(proj.bias, x.reshape(-1, x.shape[-1]), proj.weight.t(), use_gelu=True)
    return y.view(*x.shape[:-1], proj.out_features)


def run_images(p: Pipeline, prompt: str, seeds: list[int], s: SamplerSettings, output_type: str = "pil"):
    """One pipeline call for all ``seeds`` of a prompt (batched CFG); image i depends only on seeds[i]."""
    import torch

    gen_device = "cpu" if p.device == "mps" else p.device
    generators = [torch.Generator(gen_device).manual_seed(seed) for seed in seeds]
    kwargs: dict[str, Any] = dict(generator=generators, num_inference_steps=s.steps, guidance_scale=s.guidance,
                                  width=s.width, height=s.height, output_type=output_type,
                                  **p.prompt_embeddings(prompt, s, len(seeds)))
    with torch.inference_mode():
        return p.pipe(**kwargs).images


class ImageBatch:
    """A batch of generated images on its way to the CPU. diffusers' PIL output converts on the CPU after waiting
    for the GPU (~0.1-0.3 s per batch of four 1024 px images, while the GPU idles); here the 8-bit conversion runs
    on the device and the copy to pinned memory does not block, so the next batch is queued at once. Pixel for
    pixel the same as ``output_type="pil"``: the same float32 ``x * 255``, round half to even, on the same values."""

    def __init__(self, images: Any) -> None:
        import torch

        with torch.inference_mode():
            frames = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
            self._host = frames.to("cpu", non_blocking=frames.is_cuda)  # CUDA: an event marks the copy done
        self._ready = None
        if frames.is_cuda:
            self._ready = torch.cuda.Event()
            self._ready.record()

    def __len__(self) -> int:
        return self._host.shape[0]

    def pil(self, index: int):
        """Image ``index`` as PIL (waits for its copy; call from any thread)."""
        from PIL import Image

        if self._ready is not None:
            self._ready.synchronize()
        return Image.fromarray(self._host[index].numpy())


def make_images(p: Pipeline, prompt: str, seeds: list[int], s: SamplerSettings) -> ImageBatch:
    """``run_images`` without waiting for the GPU: the images come back as an ``ImageBatch``."""
    return ImageBatch(run_images(p, prompt, seeds, s, output_type="pt"))


def save_png(image, path: Path, fields: dict[str, Any] | None = None) -> None:
    """Write a PIL image as PNG atomically, with provenance text chunks when ``fields`` are given."""
    import io

    from sd3tune.fsutil import atomic_write_bytes

    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_metadata(fields) if fields is not None else None)
    atomic_write_bytes(path, buf.getvalue())


def png_metadata(fields: dict[str, Any]):
    """PNG text chunks: one per field (``sd3tune:<name>``; none for a field that is None, which the JSON blob
    records as null; lists and objects as JSON), a JSON blob (``sd3tune``) and, for a single generated image (its
    fields have a ``prompt``), an A1111-style ``parameters``."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in fields.items():
        if v is None:  # absent, as the JSON's null: an empty chunk would read as an empty value (negative prompt "")
            continue
        text = json.dumps(v, ensure_ascii=False) if isinstance(v, (list, tuple, dict)) else str(v)
        info.add_text(f"sd3tune:{k}", text)
    info.add_text("sd3tune", json.dumps(fields, sort_keys=True))
    if "prompt" in fields:
        info.add_text("parameters", a1111_parameters(fields))
    return info


def a1111_parameters(fields: dict[str, Any]) -> str:
    """The ``parameters`` text AUTOMATIC1111's web UI writes (and image sites read): the prompt, a ``Negative
    prompt:`` line when there is one, then ``key: value`` pairs; a LoRA as A1111 names one, ``Lora hashes: "NAME:
    HASH"`` (the file's name and the first 12 hex digits of its SHA-256)."""
    lines = [str(fields.get("prompt"))]
    if fields.get("negative_prompt") is not None:
        lines.append(f"Negative prompt: {fields['negative_prompt']}")
    pairs = [f"Steps: {fields.get('steps')}", f"CFG scale: {fields.get('guidance')}", f"Seed: {fields.get('seed')}",
             f"Size: {fields.get('width')}x{fields.get('height')}", f"Model: {fields.get('model')}"]
    if fields.get("lora"):
        name = Path(str(fields["lora"])).stem.replace(":", "_").replace('"', "_").replace(",", "_")
        pairs.append(f'Lora hashes: "{name}: {str(fields.get("lora_sha256") or "")[:12]}"')
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text.lower()).strip("-")
    return (s[:limit].rstrip("-")) or "image"


def provenance(p: Pipeline, prompt: str, seed: int, s: SamplerSettings, scale: float, weight: float) -> dict[str, Any]:
    return {"prompt": prompt, "negative_prompt": s.negative, "seed": seed, "steps": s.steps, "guidance": s.guidance,
            "width": s.width, "height": s.height, "model": p.model,
            "lora": str(p.lora.file) if p.lora else None, "lora_sha256": p.lora.sha256 if p.lora else None,
            "lora_scale": scale if p.lora else None,
            "lora_adapter_weight": weight if p.lora else None, "max_sequence_length": p.t5_length(s),
            "drop_t5": p.pipe.text_encoder_3 is None,
            "scheduler_shift": getattr(p.pipe.scheduler.config, "shift", None), "dtype": str(p.dtype).replace("torch.", ""),
            "device": p.device, "fused": p.fused if p.lora else None, "fp8": p.fp8, "compiled": p.compiled,
            "sd3tune_version": __version__}


def chunks(seq: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]
