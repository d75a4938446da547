"""Where each sd3tune setting lives in SimpleTuner 4.10.1: option names, value conversions, and the traps of its
config loaders (measured facts, each with its test). The rest of sd3tune speaks only ``RunConfig``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from sd3tune.config.models import RunConfig, Scalar

# SimpleTuner's config files, relative to the run folder (its working directory).
CONFIG_DIR = "config"
ENV_FILE = "config.env"
JSON_FILE = "config.json"
TOML_FILE = "config.toml"
BACKENDS_FILE = "multidatabackend.json"
PROMPT_LIBRARY_FILE = "validation_prompts.json"
EXTRA_ARGS_KEY = "TRAINER_EXTRA_ARGS"

# The launcher's own variables: which config file SimpleTuner reads. Set explicitly, never inherited.
CONFIG_BACKEND_VAR = "CONFIG_BACKEND"

# Boolean spellings SimpleTuner's parser accepts.
TRUE_WORDS = {"true", "1", "yes", "y", "on"}
FALSE_WORDS = {"false", "0", "no", "n", "off"}

# SD3 facts enforced by SimpleTuner 4.10.1.
SD3_T5_MAX_LENGTH = 154  # T5 tokens used in training (models/sd3/model.py)
SD3_BUCKET_ALIGNMENT = 64  # pixels
MEGAPIXEL_THRESHOLD = 128  # VALIDATION_RESOLUTION / RESOLUTION integers below this are read as megapixels

# The files SimpleTuner 4.10.1's local backend collects for an image dataset: metadata/backends/discovery.py
# (``_discover_new_files``), caching/vae.py and prompts.py (``get_all_captions``) all list the folder with
# ``helpers.training.image_file_extensions``, which is every extension Pillow opens (``Image.registered_extensions()``
# with an OPEN plugin; the list below is Pillow 13's) united with SimpleTuner's video and audio lists. Every such file
# needs its caption (a missing NAME.txt stops training with FileNotFoundError) and is loaded as an image, a video or
# a sound by its extension (``LocalDataBackend.read_image``). A test compares these sets with the installed ones.
PIL_IMAGE_EXTENSIONS = frozenset({
    "apng", "avif", "avifs", "blp", "bmp", "bufr", "bw", "cur", "dcx", "dds", "dib", "emf", "eps", "fit", "fits",
    "flc", "fli", "ftc", "ftu", "gbr", "gif", "grib", "h5", "hdf", "icb", "icns", "ico", "iim", "im", "j2c", "j2k",
    "jfif", "jp2", "jpc", "jpe", "jpeg", "jpf", "jpg", "jpx", "mpeg", "mpg", "msp", "pbm", "pcd", "pcx", "pfm",
    "pgm", "png", "pnm", "ppm", "ps", "psd", "pxr", "qoi", "ras", "rgb", "rgba", "sgi", "tga", "tif", "tiff", "vda",
    "vst", "webp", "wmf", "xbm", "xpm",
})
VIDEO_FILE_EXTENSIONS = frozenset({"mp4", "avi", "mov", "mkv", "webm", "flv", "wmv", "m4v", "mpeg", "mpg", "3gp",
                                   "ogv"})
AUDIO_FILE_EXTENSIONS = frozenset({"wav", "wave", "flac", "mp3", "mp4a", "m4a", "aac", "ogg", "oga", "opus", "wma",
                                   "aiff", "aif", "aifc", "alac", "mp4", "mpeg", "mpg", "mkv", "webm"})
DATASET_FILE_EXTENSIONS = PIL_IMAGE_EXTENSIONS | VIDEO_FILE_EXTENSIONS | AUDIO_FILE_EXTENSIONS
DATASET_FILE_SUFFIXES = tuple(sorted(f".{ext}" for ext in DATASET_FILE_EXTENSIONS))  # list_files' name test


def dataset_file_kind(name: str) -> str | None:
    """How SimpleTuner loads a file of an image dataset: "image", "video" or "audio" (by the extension, as
    ``LocalDataBackend.read_image`` does: video wins over audio and image for shared ones such as .mpg); None for a
    file name its folder listing skips."""
    if not name.lower().endswith(DATASET_FILE_SUFFIXES):
        return None
    ext = os.path.splitext(name)[1].lower().strip(".")
    if ext in VIDEO_FILE_EXTENSIONS:
        return "video"
    if ext in AUDIO_FILE_EXTENSIONS:
        return "audio"
    return "image"


# LoRA layout SimpleTuner writes for SD3 (PEFT keys, image-stream attention by default, no alpha stored).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
RESOLVED_CONFIG_NAME = "simpletuner_config.json"  # fully resolved args SimpleTuner writes to OUTPUT_DIR
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_GUARD = ".guard"  # written last into a checkpoint folder: without it, the save was cut short

# Options SimpleTuner's env loader skips even though its env map names a key for them (it treats them as
# accelerate flags): TRAINER_DYNAMO_BACKEND / TRAINING_DYNAMO_BACKEND lines are silently ignored.
ENV_LOADER_SKIPS = {"TRAINER_DYNAMO_BACKEND": "dynamo_backend", "TRAINING_DYNAMO_BACKEND": "dynamo_backend"}

# torch.compile through SimpleTuner: its default Inductor wrapper (dynamo_wrapper=cpp) turns CUDA graphs off
# ("skipping cudagraphs due to cpp wrapper enabled") and compiles the first step far longer than
# dynamo_wrapper=python (benchmarks/README.md). Modes that ask for CUDA graphs:
CUDAGRAPH_DYNAMO_MODES = {"reduce-overhead", "max-autotune"}

# Options a run must set explicitly: SimpleTuner's defaults for them are wrong for an SD3M LoRA or missing.
# Options every run must set, with the value to set ({key}: the config.env key or config.json key of the run).
REQUIRED_OPTIONS = {
    "model_type": "set {key} to lora",
    "model_family": "set {key} to sd3",
    "pretrained_model_name_or_path": "set {key} to stabilityai/stable-diffusion-3-medium-diffusers or a local folder "
                                     "(without it SimpleTuner trains SD3.5 Medium, not SD3 Medium)",
    "output_dir": "set {key} to a folder for the LoRA and checkpoints",
    "data_backend_config": "set {key} to the multidatabackend.json path",
}

# Variables SimpleTuner reads from the process environment besides its mapped config.env keys.
CONFIG_ENV_VARS = ("ENV", "SIMPLETUNER_ENV", "SIMPLETUNER_ENVIRONMENT", "CONFIG_PATH", "CONFIG_TYPE", "CONFIG_BACKEND",
                   "SIMPLETUNER_CONFIG_BACKEND", EXTRA_ARGS_KEY)

# Known upstream bugs (see simpletuner/compat/ for those fixed in the child process).
BROKEN_OPTIONS = {
    "use_dora": "USE_DORA=true fails in SimpleTuner 4.10.1 with peft 0.21 (init_lora_weights='default' rejected)",
}


def _invert(value: Any) -> Any:
    return (not value) if isinstance(value, bool) else value


def _mode_from_st(mode: Any) -> Any:
    return "default" if mode == "" else mode  # SimpleTuner's unset mode: torch.compile's default


def _number_as_text(value: Any) -> Any:
    """A JSON number where SimpleTuner's option is text: config.json values reach its argument parser as
    ``--option=str(value)`` (configuration/cli_utils.py ``mapping_to_cli_args``), so 512 means exactly "512"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def _uniform_to_st(sampling: str) -> bool:
    return sampling == "uniform"


def _uniform_from_st(flag: Any) -> Any:
    if isinstance(flag, bool):
        return "uniform" if flag else "logit_normal"
    return flag


@dataclass(frozen=True)
class Key:
    """One sd3tune setting (dotted path in RunConfig) and the SimpleTuner option that carries it."""

    path: str
    option: str
    to_st: Callable[[Any], Any] | None = None
    from_st: Callable[[Any], Any] | None = None


KEYS: tuple[Key, ...] = (
    Key("model.model_type", "model_type"),
    Key("model.family", "model_family"),
    Key("model.name_or_path", "pretrained_model_name_or_path"),
    Key("paths.output_dir", "output_dir"),
    Key("paths.data_backend_config", "data_backend_config"),
    Key("lora.rank", "lora_rank"),
    Key("lora.alpha", "lora_alpha"),
    Key("lora.dropout", "lora_dropout"),
    Key("lora.init_type", "lora_init_type"),
    Key("optim.optimizer", "optimizer"),
    Key("optim.learning_rate", "learning_rate"),
    Key("optim.lr_scheduler", "lr_scheduler"),
    Key("optim.lr_warmup_steps", "lr_warmup_steps"),
    Key("optim.train_batch_size", "train_batch_size"),
    Key("optim.gradient_accumulation_steps", "gradient_accumulation_steps"),
    Key("optim.max_train_steps", "max_train_steps"),
    Key("optim.num_train_epochs", "num_train_epochs"),
    Key("optim.grad_clip_method", "grad_clip_method"),
    Key("optim.max_grad_norm", "max_grad_norm"),
    Key("optim.seed", "seed"),
    Key("optim.set_grads_to_none", "set_grads_to_none"),
    Key("precision.mixed_precision", "mixed_precision"),
    Key("precision.base_model_precision", "base_model_precision"),
    Key("precision.gradient_checkpointing", "gradient_checkpointing"),
    Key("timesteps.schedule_shift", "flow_schedule_shift"),
    Key("timesteps.sampling", "flow_use_uniform_schedule", _uniform_to_st, _uniform_from_st),
    Key("data.resolution", "resolution"),
    Key("data.resolution_type", "resolution_type"),
    Key("data.minimum_image_size", "minimum_image_size"),
    Key("data.caption_dropout_probability", "caption_dropout_probability"),
    # SimpleTuner gzips its caches by default; gunzipping a step's latent + 2 text embeddings kept the trainer
    # waiting for the batch (py-spy; benchmarks/bench_cache_read.py, benchmarks/README.md)
    Key("data.compress_disk_cache", "compress_disk_cache"),
    Key("data.prefetch", "dataloader_prefetch"),
    # SimpleTuner's env loader has no key for these: config.env carries them in TRAINER_EXTRA_ARGS
    Key("compile.backend", "dynamo_backend"),
    Key("compile.regional", "dynamo_use_regional_compilation"),
    Key("compile.mode", "dynamo_mode", None, _mode_from_st),
    Key("compile.wrapper", "dynamo_wrapper"),
    Key("checkpoints.step_interval", "checkpoint_step_interval"),
    Key("checkpoints.total_limit", "checkpoints_total_limit"),
    Key("validation.enabled", "validation_disable", _invert, _invert),
    Key("validation.prompt", "validation_prompt"),
    Key("validation.prompt_library", "user_prompt_library"),
    Key("validation.negative_prompt", "validation_negative_prompt"),
    Key("validation.step_interval", "validation_step_interval"),
    Key("validation.resolution", "validation_resolution", None, _number_as_text),
    Key("validation.guidance", "validation_guidance"),
    Key("validation.num_inference_steps", "validation_num_inference_steps"),
    Key("validation.seed", "validation_seed"),
    Key("validation.disable_benchmark", "disable_benchmark"),
    Key("tracking.report_to", "report_to"),
    Key("tracking.project_name", "tracker_project_name"),
    Key("tracking.run_name", "tracker_run_name"),
)
KEY_BY_OPTION = {k.option: k for k in KEYS}
KEY_BY_PATH = {k.path: k for k in KEYS}


def _get(cfg: RunConfig, path: str) -> Any:
    section, field = path.split(".")
    return getattr(getattr(cfg, section), field)


def to_simpletuner_args(cfg: RunConfig) -> dict[str, Scalar]:
    """The run as SimpleTuner options, in a stable order (None means: leave SimpleTuner's default)."""
    args: dict[str, Scalar] = {}
    for key in KEYS:
        value = cfg.lora.effective_alpha if key.path == "lora.alpha" else _get(cfg, key.path)
        if key.to_st is not None:
            value = key.to_st(value)
        if value is not None:
            args[key.option] = value
    for option, value in cfg.extra.items():
        args[option] = value
    return args


def from_simpletuner_args(args: dict[str, Any]) -> dict[str, Any]:
    """Nest SimpleTuner options into RunConfig's shape (values unvalidated); unmapped options go to ``extra``."""
    nested: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for option, value in args.items():
        key = KEY_BY_OPTION.get(option)
        if key is None:
            extra[option] = value
            continue
        if key.from_st is not None:
            value = key.from_st(value)
        section, field = key.path.split(".")
        nested.setdefault(section, {})[field] = value
    lora = nested.get("lora", {})
    if "alpha" in lora and "rank" in lora and str(lora["alpha"]).strip() in {str(lora["rank"]), f"{lora['rank']}.0"}:
        lora["alpha"] = None  # alpha == rank is what "empty" means; keeps write -> read a round trip
    if extra:
        nested["extra"] = extra
    return nested


def option_for_path(loc: tuple) -> str | None:
    """The SimpleTuner option behind a pydantic error location like ('lora', 'rank')."""
    if len(loc) >= 2 and loc[0] == "extra":
        return str(loc[1])
    if len(loc) >= 2:
        key = KEY_BY_PATH.get(f"{loc[0]}.{loc[1]}")
        return key.option if key else None
    return None


# Names that hold a secret (HF_TOKEN, WANDB_API_KEY, any *_TOKEN / *_KEY ...); no SimpleTuner option is named so
CREDENTIAL_SUFFIXES = ("_TOKEN", "_KEY", "_SECRET", "_PASSWORD")


def is_credential(name: str) -> bool:
    upper = name.lstrip("-").upper()
    return upper.endswith(CREDENTIAL_SUFFIXES) or upper in ("TOKEN", "HF_TOKEN", "WANDB_API_KEY")


def parse_bool_word(text: str) -> bool | None:
    lowered = text.strip().lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    return None
