"""SD3 (+ LoRA) inference through diffusers: finding a run's LoRA, train/inference parity, deterministic seeds,
PNG provenance. Used by `sd3tune generate`, `quickstart` and `evaluate`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Collection, Iterator, Literal, Sequence

from sd3tune import __version__
from sd3tune.config.models import RunConfig
from sd3tune.defaults import SD3M
from sd3tune.errors import Sd3tuneError
from sd3tune.findings import plural
from sd3tune.fsutil import file_sha256, model_folder
from sd3tune.simpletuner import keys
from sd3tune.simpletuner.files import LoadedRun, checkpoints, find_run_root, read_run

DIFFUSERS_T5_DEFAULT = 256  # StableDiffusion3Pipeline's max_sequence_length default
T5_MAX_TOKENS = 512  # the most StableDiffusion3Pipeline takes (check_inputs refuses more)
# safetensors metadata key holding a LoRA's peft config (lora_alpha, r, ...); diffusers configures the adapter from it,
# so peft then scales the LoRA by lora_alpha / r by itself. SimpleTuner 4.10 writes it into checkpoint-N files only.
LORA_ADAPTER_METADATA = "lora_adapter_metadata"
SIZE_MULTIPLE = 16  # VAE factor 8 x patch size 2
# H200, 1024 px, batches of 4: generate --compile costs ~16 s once and saves ~0.37 s per image (scripts/README.md)
COMPILE_PAYS_OFF = 45


@dataclass
class LoraSource:
    """A LoRA file and, when it came from a run, the run's training settings."""

    file: Path
    config: RunConfig | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    # What trained this file comes first: sd3tune's stamp (written into the final LoRA when training finished), then
    # the peft config SimpleTuner writes into each checkpoint (``lora_adapter_metadata``), and only then the run's
    # config, which may have been edited since.

    @property
    def alpha_over_rank(self) -> float:
        """The LoRA's alpha / rank as it was trained (1 when nothing says)."""
        if "sd3tune.lora_alpha" in self.metadata and "sd3tune.lora_rank" in self.metadata:
            return float(self.metadata["sd3tune.lora_alpha"]) / float(self.metadata["sd3tune.lora_rank"])
        try:
            peft = json.loads(self.metadata.get(LORA_ADAPTER_METADATA, "{}"))
            return float(peft["transformer.lora_alpha"]) / float(peft["transformer.r"])
        except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError):
            pass
        if self.config is not None:
            return self.config.lora.effective_alpha / self.config.lora.rank
        return 1.0

    @cached_property
    def sha256(self) -> str:
        """The file's SHA-256: outputs record it, since a retrain replaces the file at the same path."""
        return file_sha256(self.file)

    @property
    def base_model(self) -> str | None:
        return self.metadata.get("sd3tune.base_model") or (self.config.model.name_or_path if self.config else None)

    @property
    def schedule_shift(self) -> float | None:
        if "sd3tune.flow_schedule_shift" in self.metadata:
            return float(self.metadata["sd3tune.flow_schedule_shift"])
        return self.config.timesteps.schedule_shift if self.config else None

    @property
    def later_checkpoint(self) -> Path | None:
        """For a run's final LoRA: a checkpoint LoRA beside it with more steps, left by a later training (resumed,
        then interrupted or failed), which the run's LoRA is not."""
        from sd3tune.simpletuner.files import checkpoint_step

        steps = self.metadata.get("sd3tune.steps", "")
        if checkpoint_step(self.file.parent) is not None or not steps.isdigit():
            return None
        later = [f for f in checkpoint_loras(self.file.parent) if (checkpoint_step(f.parent) or 0) > int(steps)]
        return later[-1] if later else None

    @property
    def square_side(self) -> int | None:
        """The side of the square images the LoRA was trained at (None for an area resolution: SD3's 1024 then)."""
        if "sd3tune.resolution" in self.metadata:
            if self.metadata.get("sd3tune.resolution_type", "pixel") == "area":
                return None
            return int(float(self.metadata["sd3tune.resolution"]))
        if self.config is not None and self.config.data.resolution_type != "area":
            return int(self.config.data.resolution)
        return None


def checkpoint_loras(output_dir: Path) -> list[Path]:
    """The LoRA file of each checkpoint-N folder that holds one, by step."""
    return [p / keys.LORA_WEIGHT_NAME for p in checkpoints(output_dir) if (p / keys.LORA_WEIGHT_NAME).is_file()]


def latest_lora_in(output_dir: Path) -> Path | None:
    final = output_dir / keys.LORA_WEIGHT_NAME
    if final.is_file():
        return final
    ckpts = checkpoint_loras(output_dir)
    return ckpts[-1] if ckpts else None


def read_safetensors_header(file: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """The safetensors header: (``__metadata__``, tensor name -> dtype/shape), reading only the header."""
    import struct

    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise Sd3tuneError(f"{file} is not a safetensors file", hint="pass a .safetensors LoRA")
        (size,) = struct.unpack("<Q", head)
        if size > 100_000_000:
            raise Sd3tuneError(f"{file} is not a safetensors file", hint="pass a .safetensors LoRA")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Sd3tuneError(f"{file} is not a safetensors file", hint="pass a .safetensors LoRA") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__") or {}, dict):
        raise Sd3tuneError(f"{file} is not a safetensors file", hint="pass a .safetensors LoRA")
    return dict(header.get("__metadata__") or {}), {k: v for k, v in header.items() if k != "__metadata__"}


def safetensors_metadata(file: Path) -> dict[str, str] | None:
    """A safetensors file's metadata (a LoRA's sd3tune stamp); None for a file that is missing, unreadable or not
    safetensors (a checkpoint cut short)."""
    try:
        return read_safetensors_header(file)[0] if file.is_file() else None
    except (Sd3tuneError, OSError):
        return None


def resolve_lora(spec: Path, run: LoadedRun | None = None) -> LoraSource:
    """Accept a run folder, an output/checkpoint folder, or a .safetensors file. The training settings come from
    ``run`` when the caller has read it already, else from the run folder at or above ``spec``."""
    spec = spec.expanduser()
    if not spec.exists():
        raise Sd3tuneError(f"LoRA {spec} does not exist", hint="pass a run folder, a checkpoint folder or a .safetensors file")
    root = run.paths.root if run is not None else find_run_root(spec if spec.is_dir() else spec.parent)
    if run is None and root is not None:
        run = read_run(root)
    if spec.is_dir():
        if run is not None and spec.resolve() == root.resolve():  # the run folder: its OUTPUT_DIR, wherever it is
            output_dir = run.output_dir() or spec / "output"
            if (file := latest_lora_in(output_dir)) is None:
                raise Sd3tuneError(f"no {keys.LORA_WEIGHT_NAME} under {output_dir}: the run is not trained yet",
                                   hint=f"train it first: `sd3tune train {spec}`")
        elif (file := latest_lora_in(spec)) is None:
            raise Sd3tuneError(f"no {keys.LORA_WEIGHT_NAME} under {spec}",
                               hint="train first (`sd3tune train RUN_DIR`), or pass the .safetensors file")
    else:
        file = spec
    metadata, tensors = read_safetensors_header(file)
    check_lora_keys(file, tensors)  # from the header alone: a file that is no LoRA fails before any model loads
    return LoraSource(file=file.resolve(), config=run.config if run is not None else None, metadata=metadata)


_LORA_KEY = re.compile(r"transformer\.(.+)\.lora_([AB])\.weight")


def check_lora_keys(file: Path, tensors: dict[str, Any]) -> None:
    """Refuse a file whose tensor names (``tensors``: its safetensors header) are not those of an SD3 transformer
    LoRA in the diffusers format, e.g. a CLIP or UNet checkpoint, or a kohya-format LoRA. Needs no model."""
    names = list(tensors)
    if not names or not all(n.startswith("transformer.") for n in names):
        other = next((n for n in names if not n.startswith("transformer.")), "no tensors")
        raise Sd3tuneError(f"{file} is not an SD3 transformer LoRA (found key {other!r})",
                           hint="use a LoRA trained for SD3 with sd3tune/SimpleTuner")
    for name in names:
        if _LORA_KEY.fullmatch(name) is None:
            raise Sd3tuneError(f"{file} has {name!r}, which is not a LoRA weight of the diffusers format",
                               hint="use a LoRA trained for SD3 with sd3tune/SimpleTuner")


def check_lora_fits(file: Path, transformer: Any) -> None:
    """Refuse a LoRA whose keys or shapes do not belong to this SD3 ``transformer`` (loaded): diffusers would drop
    keys it cannot place (a partial LoRA, silently) or fail deep inside peft on a shape."""
    _, tensors = read_safetensors_header(file)
    check_lora_keys(file, tensors)
    another = "the LoRA was trained for another model; pass the right --model"
    layers = transformer.config["num_layers"]
    for name, info in tensors.items():
        block = re.search(r"transformer_blocks\.(\d+)\.", name)
        if block and int(block.group(1)) >= layers:
            raise Sd3tuneError(f"{file} has block {block.group(1)} but this model has {layers} blocks", hint=another)
        m = _LORA_KEY.fullmatch(name)
        assert m is not None  # check_lora_keys
        try:
            layer = transformer.get_submodule(m.group(1))
        except AttributeError:
            raise Sd3tuneError(f"{file} has a LoRA for {m.group(1)}, a layer this model does not have",
                               hint=another) from None
        side = "input" if m.group(2) == "A" else "output"  # lora_A is (rank, in), lora_B (out, rank)
        wanted = getattr(layer, "in_features" if side == "input" else "out_features", None)
        shape = info["shape"]
        got = (shape[1] if side == "input" else shape[0]) if len(shape) == 2 else shape
        if got != wanted:
            raise Sd3tuneError(f"{file} was trained for a layer {m.group(1)} with {side} width {got}; this model's "
                               f"has {wanted}", hint=another)


def load_adapter(pipe: Any, file: Path, name: str) -> None:
    """Load a LoRA file into the pipeline as adapter ``name``, after checking it fits this transformer."""
    import warnings

    check_lora_fits(file, pipe.transformer)
    with warnings.catch_warnings():  # peft warns when a second adapter joins the first: intended (evaluate)
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)


DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("auto", "bf16", "fp16", "fp32")
OFFLOADS = ("none", "model", "sequential")


def check_runtime_choices(device: str, dtype: str, offload: str = "none") -> None:
    """Refuse a --device / --dtype / --offload value before anything loads."""
    for name, value, allowed, hint in (
            ("--device", device, DEVICES, "auto picks CUDA, then MPS, then the CPU"),
            ("--dtype", dtype, DTYPES, "auto is bf16 on a CUDA GPU that has it, else fp16 on a GPU, fp32 on the CPU"),
            ("--offload", offload, OFFLOADS, "model moves each model to the GPU when used (~16 GB cards); sequential "
                                             "moves each layer (least memory, slowest)")):
        if value not in allowed:
            raise Sd3tuneError(f"{name} {value!r} is not one of {', '.join(allowed)}", hint=hint)


HUB_PROBE_SECONDS = 3.0


def hub_unreachable(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why the Hugging Face Hub cannot be reached now, or None when it answers. Offline mode (HF_HUB_OFFLINE) says
    so at once; otherwise one request to the Hub's endpoint (HF_ENDPOINT; proxies from the environment apply) with
    a short timeout, where huggingface_hub itself would retry for about a minute before giving up."""
    import httpx
    from huggingface_hub import constants, is_offline_mode

    if is_offline_mode():
        return "offline mode is on (HF_HUB_OFFLINE)"
    try:
        httpx.head(constants.ENDPOINT, timeout=timeout)  # any answer, even an error status, means it is reachable
    except (httpx.HTTPError, httpx.InvalidURL, ValueError, OSError) as exc:
        return f"{constants.ENDPOINT} cannot be reached ({str(exc).strip() or type(exc).__name__})"
    return None


def in_hub_cache(repo_id: str, filename: str = "config.json") -> bool:
    """Whether the local Hugging Face cache holds ``filename`` of the Hub model ``repo_id``."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except ValueError:  # not a valid repo id: the loader says why
        return False


def hub_files_only(repo_id: str, what: str, filename: str, hint: str) -> bool:
    """Before loading ``what`` by its Hub id ``repo_id``: True when the Hub is out of reach but the local cache holds
    it (``filename`` stands for it), so it loads with ``local_files_only`` at once; False when the Hub answers.
    Out of reach and not cached: raises the one-line error with ``hint`` now, instead of after the loader's retries
    and its page of advice."""
    why = hub_unreachable()
    if why is None:
        return False
    if not in_hub_cache(repo_id, filename):
        raise Sd3tuneError(f"cannot load {what}: it is not in the local Hugging Face cache and the Hub is out of "
                           f"reach: {why}", hint=hint)
    return True


def model_files_only(model: str, otherwise: str) -> bool:
    """``hub_files_only`` for the diffusers model ``model`` (a Hub id), whose error says how to download it, or
    ``otherwise`` (the local alternative: the flag or key to set)."""
    return hub_files_only(model, model, "model_index.json",
                          hint=f"download it once where the Hub is reachable (`hf download {model}`; gated models "
                               f"need `hf auth login` and accepted terms), or {otherwise}")


def quiet_libraries() -> None:
    """Keep diffusers/transformers to errors and no loading bars: sd3tune prints its own progress."""
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*torch_dtype.*")


def pick_device(device: str) -> str:
    import torch

    if device != "auto":
        if device == "cuda" and not torch.cuda.is_available():
            raise Sd3tuneError("--device cuda but no CUDA GPU is visible", hint="use --device auto or cpu")
        if device == "mps" and not torch.backends.mps.is_available():
            raise Sd3tuneError("--device mps but MPS is not available", hint="use --device auto or cpu")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(dtype: str, device: str):
    import torch

    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype != "auto":
        return table[dtype]
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


@dataclass
class SamplerSettings:
    steps: int = 28
    guidance: float = 7.0
    width: int = 1024
    height: int = 1024
    negative: str | None = None
    max_sequence_length: int = DIFFUSERS_T5_DEFAULT
    shift: float | None = None


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
        encoders run for the prompt and the negative in every batch (~0.04 s each for SD3M on an H100, ~2% of a
        compiled batch of four). The same tensors the pipeline would compute, so the same images."""
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

        Measured at 1024 px, 28 steps, batches of 4 (scripts/bench_generate.py, no LoRA), against the plain
        diffusers pipeline in the same command: H100 1.066 and 1.087 s/image (0.65x, 0.68x; 2026-11-27), 1.121 on
        another H100 (0.695x; first image after 39 s); with ``fp8`` 0.967 and 0.988 (0.59x, 0.61x); before the GELU
        fusion and the per-prompt text encoding H100 1.144 (0.70x), H200 1.093 (0.70x). Blocks alone: 1.163 s/image
        (H200), 1.21 (H100)."""
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
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    quiet_libraries()
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
    identical blocks share one compiled graph, so compiling costs ~6-10 s on an H100/H200 instead of minutes for the
    whole model. It happens lazily on the first call; each new batch size compiles once more (static shapes)."""
    blocks = getattr(transformer, "transformer_blocks", None) or []
    for block in blocks:
        block.compile(dynamic=False, mode=mode)
    return len(blocks)


def fuse_gelu_epilogues(transformer: Any) -> int:
    """On CUDA, compute each feed-forward's first linear layer and its tanh-GELU as one cuBLASLt matmul with a GELU
    epilogue (``torch._addmm_activation``, whose CUDA GELU is the tanh approximation SD3 uses; its CPU kernel uses
    the exact GELU, so CPU tensors take diffusers' own path). Unfused, the 6144-wide activation is written by the
    matmul, read and written again by the GELU: ~0.8 GB of memory traffic per block and step at a CFG batch of 8 at
    1024 px (H100: 1.99 -> 1.78 ms per image-stream feed-forward, compiled; scripts/bench_feedforward.py). Layers
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


def free_name(folder: Path, stem: str, taken: Collection[Path] = ()) -> Path:
    """``folder/stem.png``, or ``stem-2.png``... when that file exists (or is ``taken`` by a pending write)."""
    candidate = folder / f"{stem}.png"
    n = 2
    while candidate.exists() or candidate in taken:
        candidate = folder / f"{stem}-{n}.png"
        n += 1
    return candidate


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
