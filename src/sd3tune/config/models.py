"""Typed settings of an SD3 LoRA run, split by concern. sd3tune's own vocabulary: the SimpleTuner adapter
(``sd3tune.simpletuner.keys``) maps each field to SimpleTuner's option and config.env key.

Every model forbids unknown fields and documents every field; the descriptions double as `sd3tune init --help`
material and as the comments written into config.env.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from sd3tune.defaults import SD3M

Scalar = StrictBool | int | float | str


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Section):
    name_or_path: str = Field(SD3M, min_length=1,
                              description="Hub id or local diffusers folder of the base model (SD3 Medium by default).")
    family: Literal["sd3"] = Field("sd3", description="SimpleTuner model family; sd3tune trains SD3 only.")
    model_type: Literal["lora"] = Field("lora", description="Training type; sd3tune trains LoRA adapters.")


class LoraSettings(_Section):
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank (adapter width).")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; empty means alpha = rank (scale 1).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0,
                           description="LoRA dropout; 0 is faster and SD3 LoRAs rarely need it.")
    init_type: Literal["default", "gaussian", "loftq", "olora", "pissa"] = Field(
        "default", description="How LoRA weights are initialised.")

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


MAX_STEPS = 10_000_000  # steps, epochs: far beyond any real training (SimpleTuner takes any int); catches typos


class OptimSettings(_Section):
    optimizer: str = Field("torch-adamw", min_length=1,
                           description="SimpleTuner optimizer name (e.g. torch-adamw, adamw_bf16, prodigy).")
    learning_rate: float = Field(1e-4, gt=0, le=1.0, description="Peak learning rate.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial", "sine"] = Field("constant", description="Learning-rate schedule.")
    lr_warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Warm-up steps before the peak learning rate.")
    train_batch_size: int = Field(1, ge=1, le=256, description="Images per step per GPU.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="Steps accumulated per update.")
    max_train_steps: int | None = Field(1000, ge=0, le=MAX_STEPS, description="Total optimizer steps; empty or 0 means train by epochs.")
    num_train_epochs: int = Field(0, ge=0, le=MAX_STEPS, description="Epochs; must be 0 when max_train_steps is set.")
    grad_clip_method: Literal["norm", "value"] = Field(
        "norm", description="Gradient clipping: norm is cheap; value scans every module each step.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clipping threshold (0 disables clipping).")
    seed: int | None = Field(42, ge=0, description="Training seed, for reproducible runs.")
    set_grads_to_none: StrictBool = Field(
        True, description="Drop the gradients after each step instead of zeroing them (PyTorch's default; "
                          "SimpleTuner's is false): one kernel fewer per LoRA tensor and step (the backward writes "
                          "each gradient instead of adding it to zeros); the same LoRA bit for bit when every LoRA "
                          "tensor gets a gradient each step, as in SD3 LoRA training.")


class PrecisionSettings(_Section):
    mixed_precision: Literal["bf16", "fp16", "no"] = Field(
        "bf16", description="Compute precision; bf16 on modern GPUs, no for CPU runs.")
    base_model_precision: str = Field(
        "no_change", description="Quantise the frozen base (e.g. int8-quanto, int8-torchao) to save memory.")
    gradient_checkpointing: StrictBool = Field(
        False, description="Recompute activations in backward: ~half the memory, ~2x slower steps.")


class TimestepSettings(_Section):
    schedule_shift: float = Field(3.0, gt=0, le=100,
                                  description="Flow-matching timestep shift (SD3 Medium uses 3).")
    sampling: Literal["logit_normal", "uniform"] = Field(
        "logit_normal", description="How training timesteps are drawn.")


class DataSettings(_Section):
    resolution: int = Field(1024, ge=64, le=4096, description="Training resolution in pixels (shorter side).")
    resolution_type: Literal["pixel", "area", "pixel_area"] = Field(
        "pixel_area", description="How resolution is read: pixel edge, megapixel area, or pixel converted to area.")
    minimum_image_size: int | None = Field(
        None, ge=0, description="Images smaller than this (same unit as resolution) are skipped.")
    caption_dropout_probability: float = Field(
        0.05, ge=0.0, le=1.0, description="Share of steps trained with an empty caption (helps CFG).")
    compress_disk_cache: StrictBool = Field(
        False, description="gzip the latent and text-embedding caches (SimpleTuner's default: on). Off reads each "
                           "step's files ~20x faster (20-35 ms less per 1024 px step, benchmarks/bench_cache_read.py) "
                           "for 10-20% more disk.")
    prefetch: StrictBool = Field(
        True, description="Load the next batch on a background thread while the GPU trains on this one (H200, "
                          "1024 px: 0.257 -> 0.236 s/step). Seeded runs still repeat exactly (sd3tune's compat "
                          "layer keeps the loader off the trainer's random generator; tested).")


class CompileSettings(_Section):
    """torch.compile through SimpleTuner (accelerate's TorchDynamoPlugin). Off by default: regional compile with CUDA
    graphs (reduce-overhead) makes steps faster than eager but the first step minutes later (it pays only after
    thousands of steps), and without CUDA graphs it is slower than eager (benchmarks/README.md). sd3tune's compat
    layer makes SimpleTuner run the compiled blocks and compile nothing else (fixes 4 and 8)."""

    backend: Literal["no", "inductor", "eager", "aot_eager", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi",
                     "fx2trt", "onnxrt", "tensorrt", "ipex", "tvm", "hpu_backend"] = Field(
        "no", description="torch.compile backend: no (eager PyTorch) or inductor (CUDA GPUs); SimpleTuner's others.")
    regional: StrictBool = Field(
        True, description="With inductor: compile the transformer blocks, not the whole model (~70-80 s, not minutes).")
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "reduce-overhead", description="Inductor mode; reduce-overhead replays CUDA graphs (fewer kernel launches).")
    wrapper: Literal["python", "cpp"] = Field(
        "python", description="Inductor's wrapper code; SimpleTuner's cpp default skips CUDA graphs, compiles ~3x longer.")


class CheckpointSettings(_Section):
    step_interval: int = Field(250, ge=1, le=MAX_STEPS, description="Save a checkpoint every N steps.")
    total_limit: int | None = Field(5, ge=1, description="Keep at most N checkpoints.")


_RESOLUTION = re.compile(r"^\d+(x\d+)?$")


class ValidationSettings(_Section):
    enabled: StrictBool = Field(True, description="Sample validation images during training.")
    prompt: str | None = Field(None, description="Prompt for validation images.")
    prompt_library: str | None = Field(
        None, description="JSON file of further validation prompts (init writes config/validation_prompts.json when "
                          "--validation-prompt is given more than once).")
    negative_prompt: str | None = Field("blurry, cropped, ugly",
                                        description="Negative prompt for validation images (SimpleTuner's default).")
    step_interval: int = Field(250, ge=1, le=MAX_STEPS, description="Sample validation images every N steps.")
    resolution: str = Field("1024x1024", description="Validation size as WIDTHxHEIGHT (a bare number is a square).")
    guidance: float = Field(5.0, ge=0, le=50, description="Classifier-free guidance for validation.")
    num_inference_steps: int = Field(28, ge=1, le=500, description="Sampling steps for validation.")
    seed: int | None = Field(42, ge=0, description="Seed for validation images.")
    disable_benchmark: StrictBool = Field(
        True, description="Skip SimpleTuner's base-model benchmark before step 1 (saves minutes).")

    @field_validator("resolution")
    @classmethod
    def _wxh(cls, v: str) -> str:
        if not _RESOLUTION.match(v):
            raise ValueError("must be WIDTHxHEIGHT, e.g. 1024x1024")
        return v


class TrackingSettings(_Section):
    report_to: Literal["none", "wandb", "tensorboard"] = Field("none", description="Experiment tracker.")
    project_name: str = Field("sd3tune", description="Tracker project name.")
    run_name: str | None = Field("sd3tune", description="Tracker run name.")


class PathSettings(_Section):
    output_dir: str = Field(..., description="Where SimpleTuner writes the LoRA, checkpoints and model card.")
    data_backend_config: str = Field(..., description="The multidatabackend.json describing the datasets.")


class RunConfig(_Section):
    """Everything sd3tune writes to SimpleTuner's config for one SD3 LoRA run."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    optim: OptimSettings = Field(default_factory=OptimSettings)
    precision: PrecisionSettings = Field(default_factory=PrecisionSettings)
    timesteps: TimestepSettings = Field(default_factory=TimestepSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    compile: CompileSettings = Field(default_factory=CompileSettings)
    checkpoints: CheckpointSettings = Field(default_factory=CheckpointSettings)
    validation: ValidationSettings = Field(default_factory=ValidationSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    paths: PathSettings
    extra: dict[str, Annotated[Scalar, Field()]] = Field(
        default_factory=dict,
        description="Other SimpleTuner options by name (checked against the pinned SimpleTuner's catalog).")
