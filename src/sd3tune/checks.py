"""Preflight of a run: every configuration, dataset and SimpleTuner-trap problem at once, before any model loads.

Used by `sd3tune check` and at the start of `sd3tune train`. Imports no torch/diffusers/SimpleTuner; every rule
is a small ``check_*`` function over a :class:`Context` that returns findings (``file:key: problem — fix``).
Rules that mirror SimpleTuner 4.10.1 behaviour name the place in its source they follow.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from sd3tune.config.models import RunConfig
from sd3tune.config.presets import PRESETS
from sd3tune.datascan import (
    CLIP_MAX_TOKENS, T5_MAX_TOKENS, ScanResult, estimate_clip_tokens, estimate_t5_tokens, scan_folder,
)
from sd3tune.defaults import SD3M
from sd3tune.errors import Sd3tuneError
from sd3tune.findings import Finding, choice_error, error, errors_in, warning
from sd3tune.simpletuner import keys
from sd3tune.simpletuner.backends import BACKENDS as BACKEND_LIST
from sd3tune.simpletuner.backends import ImageBackend, TextEmbedsBackend
from sd3tune.simpletuner.caches import run_bucket_suffix
from sd3tune.simpletuner.catalog import Catalog, load_catalog
from sd3tune.simpletuner.dataset import bucket_counts, caption_path, megapixels, minimum_megapixels, too_small
from sd3tune.simpletuner.files import (LoadedRun, RunPaths, checkpoints, config_from_args, find_run_root,
                                      incomplete_checkpoint, incomplete_hint, output_conflict, read_run,
                                      with_simpletuner_defaults)

BACKENDS = keys.BACKENDS_FILE
MAX_LISTED = 5  # file names quoted in one finding
PRESET_GB = {name: int(name.removesuffix("gb")) for name in PRESETS}  # card memory each init preset is made for
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SD3_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


@dataclass
class Summary:
    images: int = 0  # readable images in the enabled image datasets
    usable: int = 0  # of those, the ones that survive the size filter and bucket pruning
    samples_per_epoch: int = 0  # usable images x (repeats + 1)
    buckets: dict[str, int] = field(default_factory=dict)  # "WxH" -> usable images
    effective_batch: int | None = None  # batch x accumulation x GPUs
    steps: int | None = None
    steps_per_epoch: int | None = None
    epochs: float | None = None
    preset: str | None = None
    gpu_memory_gb: float | None = None
    cache_gb: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.images, "usable_images": self.usable, "samples_per_epoch": self.samples_per_epoch,
                "buckets": self.buckets, "effective_batch_size": self.effective_batch, "steps": self.steps,
                "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs, "preset": self.preset,
                "gpu_memory_gb": self.gpu_memory_gb, "cache_gb": self.cache_gb}


@dataclass
class CheckReport:
    run: LoadedRun
    findings: list[Finding]
    summary: Summary
    resume: bool = False  # checked as `sd3tune train --resume` would

    @property
    def command(self) -> str:
        """The `sd3tune check` command that makes this report again."""
        return f"sd3tune check {self.run.paths.root}" + (" --resume" if self.resume else "")

    @property
    def ok(self) -> bool:
        return not errors_in(self.findings)

    @property
    def errors(self) -> list[Finding]:
        return errors_in(self.findings)

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def as_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run.paths.root), "format": self.run.format, "resume": self.resume, "ok": self.ok,
                "errors": [f.as_dict() for f in self.errors], "warnings": [f.as_dict() for f in self.warnings],
                "summary": self.summary.as_dict()}


@dataclass
class Context:
    """What every rule sees: the run as read, a best-effort config, and which options hold invalid values."""

    run: LoadedRun
    catalog: Catalog
    cfg: RunConfig | None  # run.config, or (when that is invalid) the run with its invalid values left out
    bad: set[str]  # SimpleTuner options whose value is invalid (already reported; rules on them are skipped)
    gpus: int
    summary: Summary
    backends: list[ImageBackend | TextEmbedsBackend] | None = None  # run.backends, or the valid part of them
    backends_partial: bool = False  # some dataset entries were invalid (already reported) and are left out
    scans: dict[Path, ScanResult] = field(default_factory=dict)
    resume: bool = False  # checked for `sd3tune train --resume`: a checkpoint in the output folder is expected

    @property
    def root(self) -> Path:
        return self.run.paths.root

    @property
    def file(self) -> str:
        return self.run.paths_name()

    def where(self, option: str) -> str:
        """The key a user edits for ``option``: its config.env line, TRAINER_EXTRA_ARGS entry or JSON key."""
        return self.run.key_for(option, catalog=self.catalog)

    def key(self, option: str) -> str:
        """The bare key name for ``option`` (no line number), for use inside a message."""
        return self.run.key_for(option, located=False, catalog=self.catalog)

    def valid(self, *options: str) -> bool:
        return self.cfg is not None and not (set(options) & self.bad)

    def path(self, value: str) -> Path:
        return self.run.paths.resolve(value)

    def flag(self, option: str) -> bool:
        return self.run.args.get(option) is True  # the reader made every boolean option a bool

    def scan(self, folder: Path) -> ScanResult:
        key = folder.resolve()
        if key not in self.scans:
            self.scans[key] = scan_folder(folder)
        return self.scans[key]


# ----------------------------------------------------------------------------------------------- entry point


def check_run(run_dir: str | Path, gpus: int = 1, resume: bool = False) -> CheckReport:
    """Read and check a run folder (for a training on ``gpus``, resuming or not); never raises for a user
    mistake."""
    catalog = load_catalog()
    try:
        run = read_run(run_dir, catalog)
    except OSError as exc:  # e.g. a config file without read permission
        run = LoadedRun(paths=RunPaths(Path(run_dir).expanduser()))
        name = Path(exc.filename).name if exc.filename else str(run_dir)
        run.findings.append(error(name, "", f"cannot be read: {exc.strerror or exc}",
                                  "check the file's permissions"))
        return CheckReport(run, run.findings, Summary(), resume)
    findings = list(run.findings)
    # Nothing read from a config file that could not be parsed (the reader says why): no config rule applies.
    cfg, bad = best_effort_config(run, catalog) if run.config_read else (None, set())
    ctx = Context(run, catalog, cfg, bad, max(1, gpus), Summary(), resume=resume)
    ctx.backends, ctx.backends_partial = best_effort_backends(run)
    for rule in RULES:
        findings += _guarded(rule, ctx)
    return CheckReport(run, _dedupe(findings), ctx.summary, resume)


def _guarded(rule: Callable[[Context], list[Finding]], ctx: Context) -> list[Finding]:
    """Run one rule; a bug in a rule becomes one finding instead of hiding every other finding."""
    try:
        return rule(ctx)
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("SD3TUNE_DEBUG"):
            raise
        return [error("sd3tune", rule.__name__, f"internal error while checking: {type(exc).__name__}: {exc}",
                      "please report it; SD3TUNE_DEBUG=1 shows the traceback")]


def _dedupe(findings: list[Finding]) -> list[Finding]:
    seen, out = set(), []
    for f in findings:
        if (f.severity, f.file, f.key, f.message) not in seen:
            seen.add((f.severity, f.file, f.key, f.message))
            out.append(f)
    return out


def best_effort_config(run: LoadedRun, catalog: Catalog) -> tuple[RunConfig | None, set[str]]:
    """``run.config``, or when it failed validation, the config without its invalid values (for the cross-checks,
    which then skip rules that involve the options returned as bad). Those values are already reported."""
    if run.config is not None or run.format is None:
        return run.config, set()
    args = with_simpletuner_defaults(run.args, catalog)
    # unset required options are reported; RunConfig's defaults stand in (rules on paths check the option is set)
    args.setdefault("output_dir", str(run.paths.output))
    args.setdefault("data_backend_config", str(run.paths.backends))
    bad: set[str] = set()
    for _ in range(len(keys.KEYS) + 8):
        try:
            return config_from_args(args), bad
        except ValidationError as exc:
            dropped = False
            for err in exc.errors():
                option = keys.option_for_path(err["loc"])
                if option and option in args:
                    bad.add(option)
                    del args[option]
                    dropped = True
            if not dropped:
                return None, bad
    return None, bad


def best_effort_backends(run: LoadedRun) -> tuple[list[ImageBackend | TextEmbedsBackend] | None, bool]:
    """``run.backends``, or when they failed validation, each dataset without its invalid keys (entries missing a
    required key are left out), so that the data checks still run. Returns (backends, partial)."""
    if run.backends is not None or run.backend_entries is None:
        return run.backends, False
    out, partial = [], False
    for entry in run.backend_entries:
        entry = dict(entry) if isinstance(entry, dict) else {}
        for _ in range(len(entry) + 1):
            try:
                out.append(BACKEND_LIST.validate_python([entry])[0])
                break
            except ValidationError as exc:
                partial = True
                fields = {str(e["loc"][2]) for e in exc.errors() if len(e["loc"]) > 2}
                removable = (fields & set(entry)) - {"id", "dataset_type"}
                if not removable:
                    break
                for name in removable:
                    del entry[name]
    return out, partial


# ----------------------------------------------------------------------------------------------- config rules


def check_extra_options(ctx: Context) -> list[Finding]:
    """Type, choice and known-bug checks of the options sd3tune has no typed field for (TRAINER_EXTRA_ARGS / JSON)."""
    out = []
    for option, value in ctx.run.args.items():
        if option in keys.KEY_BY_OPTION or isinstance(value, (list, dict)) or value is None:
            continue  # typed fields are validated by RunConfig; non-scalars are reported by it too
        opt = ctx.catalog.option(option)
        if opt is None:
            continue
        where = ctx.where(option)
        text = str(value).strip()
        before = len(out)
        if opt.kind == "bool" and not isinstance(value, bool):
            out.append(error(ctx.file, where, f"{text!r} is not true/false", f"write --{option}=true or false"))
        elif opt.kind in ("int", "float") and isinstance(value, bool):
            out.append(error(ctx.file, where, f"{text} is a boolean; --{option} takes a number"))
        elif opt.kind == "int":
            try:
                int(text)
            except ValueError:
                out.append(error(ctx.file, where, f"{text!r} is not an integer", f"write --{option}=N"))
        elif opt.kind == "float":
            try:
                float(text)
            except ValueError:
                out.append(error(ctx.file, where, f"{text!r} is not a number", f"write --{option}=NUMBER"))
        if opt.choices and not isinstance(value, bool) and text not in opt.choices and len(out) == before:
            out.append(choice_error(ctx.file, where, text, opt.choices, cutoff=0.5))
        if option in keys.BROKEN_OPTIONS and value is True:
            out.append(error(ctx.file, where, keys.BROKEN_OPTIONS[option], f"remove --{option} (use plain LoRA)"))
    return out


def check_traps(ctx: Context) -> list[Finding]:
    """SimpleTuner traps that a valid-looking value falls into (keys.py records each, with its test)."""
    cfg, f, out = ctx.cfg, ctx.file, []
    if cfg is None:
        return out
    if ctx.valid("optimizer") and cfg.optim.optimizer not in ctx.catalog.optimizers:
        name = cfg.optim.optimizer
        close = difflib.get_close_matches(name, ctx.catalog.optimizers, n=3, cutoff=0.5)
        hint = "use torch-adamw (fast, tuned default) or adamw_bf16" if name.lower() in ("adamw", "adam") else (
            f"did you mean {' or '.join(close)}?" if close else "use torch-adamw")
        hint += f"; valid: {', '.join(ctx.catalog.optimizers)}"
        out.append(error(f, ctx.where("optimizer"), f"SimpleTuner has no optimizer {name!r}; it refuses to start",
                         hint))
    bmp = ctx.catalog.option("base_model_precision")
    if ctx.valid("base_model_precision") and bmp and bmp.choices:
        value = cfg.precision.base_model_precision
        if value not in bmp.choices:
            out.append(choice_error(f, ctx.where("base_model_precision"), value, bmp.choices, cutoff=0.5))
        elif value.endswith("-quanto"):
            out.append(warning(f, ctx.where("base_model_precision"),
                               f"{value} died at the first training step with torch 2.11",
                               "prove it on your GPU with a short run, or use no_change with gradient checkpointing"))
    if ctx.valid("validation_resolution"):
        res = cfg.validation.resolution
        sides = [int(x) for x in res.split("x")]
        if any(s < keys.MEGAPIXEL_THRESHOLD for s in sides):
            out.append(error(f, ctx.where("validation_resolution"),
                             f"{res!r}: SimpleTuner reads numbers below {keys.MEGAPIXEL_THRESHOLD} as megapixels "
                             f"({sides[0]} -> {sides[0]} MP, out of memory)", "write WIDTHxHEIGHT, e.g. 1024x1024"))
        elif any(s % keys.SD3_BUCKET_ALIGNMENT for s in sides):
            out.append(warning(f, ctx.where("validation_resolution"), f"{res!r} is not a multiple of 64",
                               "SD3 works in 64 px steps"))
    speed = cfg.compile
    if speed.backend == "inductor" and speed.mode in keys.CUDAGRAPH_DYNAMO_MODES and speed.wrapper != "python":
        out.append(warning(f, ctx.where("dynamo_wrapper"),
                           f"dynamo_mode={speed.mode} asks for CUDA graphs, but the C++ Inductor wrapper turns them off "
                           "(and compiles ~3x longer)", "set --dynamo_wrapper=python"))
    if ctx.valid("mixed_precision") and cfg.precision.mixed_precision == "fp16":
        out.append(warning(f, ctx.where("mixed_precision"), "SD3 overflows in fp16", "use bf16"))
    if ctx.valid("report_to") and cfg.tracking.report_to == "wandb" and not os.environ.get("WANDB_API_KEY") \
            and not (Path.home() / ".netrc").is_file():
        out.append(warning(f, ctx.where("report_to"), "wandb is selected but no WANDB_API_KEY is set",
                           "export WANDB_API_KEY or run `wandb login`"))
    return out


def check_steps(ctx: Context) -> list[Finding]:
    """MAX_NUM_STEPS needs NUM_EPOCHS=0 (cmd_args.py refuses both), and something must say how long to train."""
    cfg, f, out = ctx.cfg, ctx.file, []
    if cfg is None or not ctx.valid("max_train_steps", "num_train_epochs"):
        return out
    steps, epochs = cfg.optim.max_train_steps or 0, cfg.optim.num_train_epochs
    if steps > 0 and epochs > 0:
        if "num_train_epochs" in ctx.run.args:
            out.append(error(f, ctx.where("num_train_epochs"),
                             f"is {epochs} while {ctx.key('max_train_steps')} is {steps}; SimpleTuner refuses both "
                             "(after ~30 s of imports)", f"set {ctx.key('num_train_epochs')}=0 to train by steps"))
        else:
            out.append(error(f, ctx.where("num_train_epochs"),
                             f"is not set, so SimpleTuner's default {epochs} applies, and with "
                             f"{ctx.key('max_train_steps')}={steps} it refuses to start",
                             f"add {ctx.key('num_train_epochs')}=0"))
    if steps == 0 and epochs == 0:
        out.append(error(f, ctx.where("max_train_steps"), f"neither steps nor epochs are set "
                                                          f"({ctx.key('num_train_epochs')} is 0): nothing to train",
                         f"set {ctx.key('max_train_steps')} (and {ctx.key('num_train_epochs')}=0)"))
    if steps and ctx.valid("lr_warmup_steps") and cfg.optim.lr_warmup_steps >= steps:
        out.append(warning(f, ctx.where("lr_warmup_steps"), f"{cfg.optim.lr_warmup_steps} warm-up steps >= "
                                                            f"{steps} training steps: the peak rate is never reached",
                           "use about 5-10% of the steps"))
    if steps and ctx.valid("checkpoint_step_interval") and cfg.checkpoints.step_interval > steps:
        out.append(warning(f, ctx.where("checkpoint_step_interval"),
                           f"{cfg.checkpoints.step_interval} > {steps} steps: no checkpoint before the end",
                           "lower it to resume or compare checkpoints"))
    if steps and cfg.validation.enabled and ctx.valid("validation_step_interval", "validation_disable") \
            and cfg.validation.step_interval > steps:
        out.append(warning(f, ctx.where("validation_step_interval"),
                           f"{cfg.validation.step_interval} > {steps} steps: no validation images during training",
                           "lower it, or turn validation off"))
    return out


def check_training(ctx: Context) -> list[Finding]:
    """LoRA rank/alpha, learning rate and validation prompt sanity (warnings)."""
    cfg, f, out = ctx.cfg, ctx.file, []
    if cfg is None:
        return out
    if ctx.valid("lora_rank", "lora_alpha"):
        rank, alpha = cfg.lora.rank, cfg.lora.effective_alpha
        ratio = alpha / rank
        if not 0.25 <= ratio <= 4:
            out.append(warning(f, ctx.where("lora_alpha"), f"alpha/rank = {alpha:g}/{rank} scales the LoRA update by "
                                                           f"{ratio:g}", "alpha = rank is the usual choice"))
        if alpha != rank:
            out.append(warning(f, ctx.where("lora_alpha"), f"alpha {alpha:g} != rank {rank}: SimpleTuner stores no "
                                                           "alpha, so diffusers and other tools load the LoRA at "
                                                           f"alpha = rank ({rank / alpha:g}x the trained strength)",
                               f"set {ctx.key('lora_alpha')} to {rank}, or scale the LoRA by {alpha / rank:g} when "
                               "loading it"))
        if rank > 128:
            out.append(warning(f, ctx.where("lora_rank"), f"rank {rank} is unusually large for an SD3 LoRA",
                               "16-64 is typical"))
    if ctx.valid("learning_rate") and cfg.optim.learning_rate > 1e-3:
        out.append(warning(f, ctx.where("learning_rate"), f"{cfg.optim.learning_rate:g} is high for an SD3 LoRA",
                           "1e-4 is a good start"))
    if ctx.valid("validation_prompt", "validation_disable") and cfg.validation.enabled:
        prompt = cfg.validation.prompt
        if not prompt:
            out.append(warning(f, ctx.where("validation_prompt"), "validation is on but there is no prompt",
                               f"set {ctx.key('validation_prompt')} or turn validation off"))
        else:
            out += _prompt_tokens(f, ctx.where("validation_prompt"), prompt)
    return out


def _prompt_tokens(file: str, where: str, prompt: str) -> list[Finding]:
    clip, t5 = estimate_clip_tokens(prompt), estimate_t5_tokens(prompt)
    if t5 > T5_MAX_TOKENS:
        return [warning(file, where, f"about {t5} T5 tokens: SD3 training reads {T5_MAX_TOKENS}, the rest is cut",
                        "shorten the prompt")]
    if clip > CLIP_MAX_TOKENS:
        return [warning(file, where, f"about {clip} CLIP tokens: CLIP reads {CLIP_MAX_TOKENS} (T5 reads the rest)",
                        "put the important words first")]
    return []


# ----------------------------------------------------------------------------------------------- paths


def check_model(ctx: Context) -> list[Finding]:
    """A local base model must be an SD3 diffusers folder; a Hub id must be reachable or cached."""
    if "pretrained_model_name_or_path" not in ctx.run.args or not ctx.valid("pretrained_model_name_or_path"):
        return []
    name = ctx.cfg.model.name_or_path
    f, where = ctx.file, ctx.where("pretrained_model_name_or_path")
    path = ctx.path(name)
    if not name.startswith((".", "/", "~")) and not path.exists():
        if not _HUB_ID.match(name):
            return [error(f, where, f"{name!r} is neither an existing folder nor a Hub id (org/name)",
                          f"use {SD3M} or a local diffusers folder")]
        return _check_hub_model(f, where, name, path)
    if not path.exists():
        return [error(f, where, f"local model folder {path} does not exist",
                      f"fix the path, or use the Hub id {SD3M}")]
    if not path.is_dir():
        return [error(f, where, f"{path} is a file, not a diffusers folder",
                      "point at the folder that holds model_index.json")]
    index = path / "model_index.json"
    if not index.is_file():
        return [error(f, where, f"{path} has no model_index.json: not a diffusers pipeline folder",
                      "point at the folder that holds model_index.json, transformer/ and vae/")]
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as exc:
        return [error(f, where, f"{index} is not readable JSON ({exc})", "re-download the model")]
    out = []
    cls = str(meta.get("_class_name", ""))
    if "StableDiffusion3" not in cls:
        out.append(error(f, where, f"{path} holds a {cls or 'unknown'} pipeline, not Stable Diffusion 3",
                         "use an SD3 diffusers folder"))
        return out
    parts = [k for k, v in meta.items() if not k.startswith("_") and isinstance(v, list) and v and v[0]]
    missing = [p for p in dict.fromkeys([*_SD3_PARTS, *parts]) if not (path / p).is_dir()]
    if missing:
        out.append(error(f, where, f"{path} lacks {', '.join(p + '/' for p in missing)}",
                         "use a complete SD3 diffusers folder (re-download it)"))
    for part in ("transformer", "vae"):
        folder = path / part
        if folder.is_dir() and not (folder / "config.json").is_file():
            out.append(error(f, where, f"{folder} has no config.json", "re-download the model"))
        elif folder.is_dir() and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            out.append(error(f, where, f"{folder} holds no weights (*.safetensors)", "re-download the model"))
    return out


def _hf_home() -> Path:
    """huggingface_hub's home folder, resolved the way it does (HF_HOME, else XDG_CACHE_HOME/huggingface)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser()


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return _hf_home() / "hub"


def _check_hub_model(f: str, where: str, name: str, path: Path) -> list[Finding]:
    cached = any((_hub_cache() / f"models--{name.replace('/', '--')}" / "snapshots").glob("*/model_index.json"))
    if cached:
        return []
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return [error(f, where, f"{name} is no local folder ({path} does not exist) and not in the Hugging Face "
                                "cache, and HF_HUB_OFFLINE is set", "fix the path, or download the model first")]
    if name != SD3M:
        return [warning(f, where, f"no local folder {path}: SimpleTuner will download {name} from the Hub",
                        "if you meant a local folder, fix the path")]
    token_file = Path(os.environ.get("HF_TOKEN_PATH") or _hf_home() / "token").expanduser()
    if not (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or token_file.is_file()):
        return [warning(f, where, f"{name} is gated and no Hugging Face token was found; the download (~10 GB) "
                                  "will fail", "accept the licence on its Hub page, then `hf auth login`")]
    return []


def check_paths(ctx: Context) -> list[Finding]:
    """DATALOADER_CONFIG must be the file sd3tune checks; OUTPUT_DIR must be creatable."""
    out, f = [], ctx.file
    if "data_backend_config" in ctx.run.args and ctx.cfg is not None and ctx.valid("data_backend_config"):
        target = ctx.path(ctx.cfg.paths.data_backend_config)
        ours = ctx.run.paths.backends
        if target.resolve() == ours.resolve():
            pass  # a missing or broken file is reported by the reader
        elif not target.is_file():
            out.append(error(f, ctx.where("data_backend_config"), f"{target} does not exist",
                             f"point it at {ours}"))
        else:
            out.append(error(f, ctx.where("data_backend_config"),
                             f"SimpleTuner would read {target}, but the run's datasets are in {ours}",
                             f"point it at {ours}"))
    if "output_dir" in ctx.run.args and ctx.cfg is not None and ctx.valid("output_dir"):
        output = ctx.path(ctx.cfg.paths.output_dir)
        if output.exists() and not output.is_dir():
            out.append(error(f, ctx.where("output_dir"), f"{output} is a file", "choose a folder path"))
        else:
            out += _unwritable(output, f, ctx.where("output_dir"))
        out += _in_another_run(ctx, output, f, ctx.where("output_dir"), ctx.run.paths.output)
        if ctx.resume:  # what `sd3tune train --resume` refuses is an error here too: check said ok, train refused
            steps = ctx.cfg.optim.max_train_steps if ctx.valid("max_train_steps") else None
            conflict = output_conflict(output, resume=True, steps=steps)
            if conflict:
                out.append(error(f, ctx.where("output_dir"), conflict[0], conflict[1]))
            else:
                out += _resumed_checkpoint(ctx, output, f)
        elif output.is_dir() and (conflict := output_conflict(output, resume=False, steps=None)):
            # a finished or interrupted run: train refuses until the user says what they want
            out.append(warning(f, ctx.where("output_dir"), f"{conflict[0]}, so `sd3tune train` refuses",
                               conflict[1]))
    for b in ctx.run.backends or []:
        folder = ctx.path(b.cache_dir_vae if isinstance(b, ImageBackend) else b.cache_dir)
        key = f"{b.id}.{'cache_dir_vae' if isinstance(b, ImageBackend) else 'cache_dir'}"
        out += _in_another_run(ctx, folder, BACKENDS, key, ctx.run.paths.cache)
        if not b.disabled:
            out += _unwritable(folder, BACKENDS, key)
        if isinstance(b, ImageBackend) and b.cache_file_suffix:
            out += _other_runs_suffix(ctx, b)
        if isinstance(b, ImageBackend) and not b.disabled and ctx.path(b.instance_data_dir).is_dir():
            out += _unwritable(ctx.path(b.instance_data_dir), BACKENDS, f"{b.id}.instance_data_dir",
                               "SimpleTuner writes its aspect-bucket cache (aspect_ratio_bucket_*.json) into the "
                               "image folder", "copy the images to a folder you can write to")
    return out


def _other_runs_suffix(ctx: Context, b: ImageBackend) -> list[Finding]:
    """A run folder copied after `init` keeps the original's cache_file_suffix: the two runs then share (and fill in
    each other's settings from) SimpleTuner's bucket cache in the image folder."""
    ours = run_bucket_suffix(b.id, ctx.root)
    made_by_init = re.fullmatch(rf"{re.escape(b.id)}-[0-9a-f]{{8}}", b.cache_file_suffix or "")
    if not made_by_init or b.cache_file_suffix == ours:
        return []
    return [warning(BACKENDS, f"{b.id}.cache_file_suffix", f"{b.cache_file_suffix!r} was made for another run folder "
                                                           "(copied?); both runs would share SimpleTuner's bucket "
                                                           "cache in the image folder and mix their settings",
                    f"set it to {ours!r}")]


def _unwritable(path: Path, file: str, key: str, why: str = "",
                hint: str = "choose a folder you can write to") -> list[Finding]:
    """``path`` (a folder SimpleTuner writes, made if missing) cannot be written: it fails there after loading."""
    parent = _existing_ancestor(path)
    if parent is None or os.access(parent, os.W_OK | os.X_OK):
        return []
    what = f"{parent} is not writable" + ("" if parent == path else f", so {path} cannot be made")
    return [error(file, key, what + (f"; {why}" if why else ""), hint)]


def _resumed_checkpoint(ctx: Context, output: Path, f: str) -> list[Finding]:
    """--resume: the checkpoint SimpleTuner resumes from (the latest) is incomplete, of another rank, or trained with
    other stamped settings."""
    from sd3tune.inference import read_safetensors_header
    from sd3tune.manifest import changed_settings, lora_settings

    latest = checkpoints(output)[-1]
    if incomplete_checkpoint(latest):
        return [error(f, ctx.where("output_dir"), f"{latest.name} is incomplete (its save was interrupted: it has no "
                                                  f"{keys.CHECKPOINT_GUARD}), and SimpleTuner fails resuming from it, "
                                                  "after loading the models", incomplete_hint(output, ctx.root))]
    try:
        stamp, tensors = read_safetensors_header(latest / keys.LORA_WEIGHT_NAME)
    except (Sd3tuneError, OSError):  # missing or cut short: SimpleTuner's own problem to report
        return []
    # the rank from the tensors themselves (a checkpoint sd3tune did not stamp has one too): SimpleTuner fails to load
    # a checkpoint of another rank, after loading every model
    ranks = {info["shape"][0] for name, info in tensors.items() if name.endswith("lora_A.weight") and info.get("shape")}
    if len(ranks) == 1 and ctx.valid("lora_rank") and ctx.cfg.lora.rank not in ranks:
        (rank,) = ranks
        return [error(f, ctx.where("lora_rank"), f"{rank} in {latest.name}, the checkpoint --resume continues, but "
                                                 f"{ctx.cfg.lora.rank} here: SimpleTuner cannot resume a LoRA of "
                                                 "another rank (it fails loading the checkpoint, after loading the "
                                                 "models)",
                      f"set {ctx.key('lora_rank')} back to {rank}, or train into a new output folder")]
    if ctx.bad or ctx.backends_partial:  # invalid values (reported) stand in as defaults: nothing to compare
        return []
    changes = changed_settings(stamp, lora_settings(ctx.cfg, ctx.backends or []))
    if not changes:
        return []
    return [warning(f, ctx.where("output_dir"), f"{latest.name} trained with other settings ({', '.join(changes)}); "
                                                "the resumed LoRA trains on with the new ones (its metadata records "
                                                "both, in sd3tune.history)",
                    "put the old values back to continue as before, or train into a new output folder")]


def _in_another_run(ctx: Context, path: Path, file: str, key: str, ours: Path) -> list[Finding]:
    """A run folder copied or moved after `init` keeps absolute paths into the old one: training would then write
    (and resume from) the other run's LoRA, checkpoints or caches."""
    other = find_run_root(path.parent if path.exists() else _existing_ancestor(path) or path)
    if other is None or other.resolve() == ctx.run.paths.root.resolve():
        return []
    return [error(file, key, f"{path} is inside another run's folder ({other}): this run would write and resume "
                              "from that run's files (was the run folder copied or moved?)",
                  f"point it at this run's own folder, e.g. {ours}")]


def _existing_ancestor(path: Path) -> Path | None:
    for p in (path, *path.parents):
        if p.exists():
            return p if p.is_dir() else None
    return None


def check_environment(ctx: Context) -> list[Finding]:
    """Stray shell variables SimpleTuner would read (sd3tune train scrubs them; a manual launch would not)."""
    stray = sorted(k for k in ctx.catalog.environment_variables() if k in os.environ)
    if not stray:
        return []
    return [warning("environment", ", ".join(stray), "set in this shell; SimpleTuner reads them and they override "
                                                     "the run's files (sd3tune train removes them, a manual "
                                                     "`simpletuner train` would not)", f"unset {' '.join(stray)}")]


# ----------------------------------------------------------------------------------------------- datasets


@dataclass
class _Dataset:
    """One enabled image dataset after SimpleTuner's size filter and bucket pruning."""

    backend: ImageBackend
    scanned: int  # images found in the folder, before any filter
    usable: Counter  # bucket (w, h) -> images left
    captions: set[str]


def check_backends(ctx: Context) -> list[Finding]:
    """multidatabackend.json: ids, text-embed caches, and each image dataset's folder, images, captions, buckets."""
    backends = ctx.backends
    if backends is None:
        return []
    out: list[Finding] = []
    ids = [b.id for b in backends]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        out.append(error(BACKENDS, dup, "id is used by more than one dataset; SimpleTuner refuses it",
                         "give each dataset a unique id"))
    text = [b for b in backends if isinstance(b, TextEmbedsBackend) and not b.disabled]
    images = [b for b in backends if isinstance(b, ImageBackend) and not b.disabled]
    if not ctx.backends_partial:
        out += _check_text_embeds(text, images)
    if not images and not ctx.backends_partial:
        out.append(error(BACKENDS, "", "no enabled image dataset", 'add one: {"id": "images", "instance_data_dir": '
                                                                   '"/path/to/images", "cache_dir_vae": ...}'))
    vae_dirs: dict[Path, str] = {}
    for b in images:
        d = ctx.path(b.cache_dir_vae).resolve()
        if d in vae_dirs:
            out.append(warning(BACKENDS, f"{b.id}.cache_dir_vae", f"same folder as dataset {vae_dirs[d]!r}",
                               "give each dataset its own VAE cache folder"))
        vae_dirs.setdefault(d, b.id)
    datasets: list[_Dataset] = []
    for b in images:
        found, dataset = _check_image_backend(ctx, b)
        out += found
        if dataset is not None:
            datasets.append(dataset)
    out += _check_run_resolution(ctx, images)
    out += _check_batches(ctx, datasets)
    _summarise(ctx, datasets)
    out += _check_disk(ctx, datasets, text)
    out += _check_memory(ctx)
    return out


def _check_text_embeds(text: list[TextEmbedsBackend], images: list[ImageBackend]) -> list[Finding]:
    """factory.py: at least one text_embeds dataset, at most one default, and image datasets must name real ones."""
    out = []
    if not text:
        return [error(BACKENDS, "", "no text_embeds dataset; SimpleTuner refuses to start",
                      'add {"id": "text-embeds", "dataset_type": "text_embeds", "default": true, '
                      '"cache_dir": "cache/text"}')]
    defaults = [t for t in text if "default" in t.model_fields_set and t.default]
    if len(defaults) > 1:
        out.append(error(BACKENDS, f"{defaults[1].id}.default", f"{len(defaults)} text_embeds datasets are default",
                         "mark exactly one default"))
    elif not defaults and len(text) > 1:
        out.append(error(BACKENDS, "", "several text_embeds datasets and none is default; SimpleTuner refuses it",
                         'add "default": true to one'))
    known = {t.id for t in text}
    for b in images:
        if b.text_embeds and b.text_embeds not in known:
            out.append(error(BACKENDS, f"{b.id}.text_embeds", f"no text_embeds dataset has id {b.text_embeds!r}",
                             f"use one of {', '.join(sorted(known))}"))
    return out


def _effective(ctx: Context, b: ImageBackend) -> tuple[float, str, float | None]:
    """(resolution, resolution_type, minimum_image_size): the dataset's own, else the config's (factory.py)."""
    e = b.effective(ctx.cfg.data) if ctx.cfg is not None else b
    return e.resolution, e.resolution_type, e.minimum_image_size


def _relative(path: Path, base: Path | None) -> str:
    try:
        return str(path.relative_to(base)) if base else path.name
    except ValueError:
        return str(path)


def _names(paths: list[Path], base: Path | None = None) -> str:
    shown = ", ".join(_relative(p, base) for p in paths[:MAX_LISTED])
    return shown + (f" and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else "")


def _check_image_backend(ctx: Context, b: ImageBackend) -> tuple[list[Finding], _Dataset | None]:
    out: list[Finding] = []
    key = f"{b.id}.instance_data_dir"
    folder = ctx.path(b.instance_data_dir)
    if not folder.exists():
        return [error(BACKENDS, key, f"{folder} does not exist",
                      "fix the path (a relative path is read from the run folder)")], None
    if not folder.is_dir():
        return [error(BACKENDS, key, f"{folder} is a file, not a folder of images", "point it at the folder")], None
    scan = ctx.scan(folder)
    for path, why in scan.corrupt[:MAX_LISTED]:
        if keys.dataset_file_kind(path.name) in ("video", "audio"):
            out.append(error(str(path), "", why, "move it out of the dataset folder"))
        else:
            out.append(error(str(path), "", f"unreadable: {why}",
                             "save it as UTF-8 text" if path.suffix == ".txt" else "delete it or re-export it"))
    if len(scan.corrupt) > MAX_LISTED:
        rest = [p for p, _ in scan.corrupt[MAX_LISTED:]]
        shown = ", ".join(_relative(p, folder) for p in rest[:40]) + (" ..." if len(rest) > 40 else "")
        out.append(error(str(folder), "", f"{len(rest)} more unreadable files: {shown}", "fix or delete them"))
    if not scan.images:
        out.append(error(BACKENDS, key, f"no readable images in {folder}",
                         "add .png/.jpg/.webp images (with .txt captions)"))
        return out, None

    # captions
    captions: set[str] = set()
    if b.caption_strategy == "textfile":
        # SimpleTuner reads the caption of every file it lists, unreadable images and videos included
        # (prompts.py get_all_captions -> FileNotFoundError at the first missing one)
        missing = scan.missing_captions
        if missing:
            noun = "images" if len(scan.files) == len(scan.images) else "files"
            what = f"no {noun[:-1]} has a" if len(missing) == len(scan.files) else \
                f"{len(missing)} of {len(scan.files)} {noun} {'has' if len(missing) == 1 else 'have'} no"
            out.append(error(BACKENDS, f"{b.id}.caption_strategy",
                             f"textfile captions, but {what} .txt caption ({_names(missing, folder)} missing); "
                             "SimpleTuner stops at the first one (FileNotFoundError)",
                             "add NAME.txt beside each file, remove the files that are not training images, or use "
                             "caption_strategy filename or instanceprompt"))
        unreadable = {p for p, _ in scan.corrupt}
        blank = [caption_path(i.path) for i in scan.empty_captions if i.blank_lines]
        if blank:
            what = "1 caption file holds" if len(blank) == 1 else f"{len(blank)} caption files hold"
            out.append(error(str(folder), "", f"{what} only blank lines ({_names(blank, folder)}); SimpleTuner reads "
                                              "no caption from them and stops when it draws that image (IndexError; "
                                              "with dataloader prefetch, the default, the loader stops instead)",
                             "write a caption in each, or empty the file (no line end) to train that image "
                             "unconditioned"))
        empty = [caption_path(i.path) for i in scan.empty_captions
                 if caption_path(i.path) not in unreadable and not i.blank_lines]
        if empty:
            what = "1 caption file is" if len(empty) == 1 else f"{len(empty)} caption files are"
            out.append(warning(str(folder), "", f"{what} empty ({_names(empty, folder)}); those images train "
                                                "unconditioned", "write a caption in each"))
        for i in scan.images:
            captions.update(i.captions)
    elif b.caption_strategy == "instanceprompt":
        if not b.instance_prompt:
            out.append(error(BACKENDS, f"{b.id}.instance_prompt", "caption_strategy instanceprompt needs "
                                                                  "instance_prompt", "set it to your trigger word"))
        else:
            captions.add(b.instance_prompt)
    else:
        captions.update(i.path.stem.replace("_", " ") for i in scan.images)
    with_text = sum(1 for i in scan.images if i.caption)
    if b.caption_strategy != "textfile" and with_text:
        out.append(warning(BACKENDS, f"{b.id}.caption_strategy", f"{with_text} images have a .txt caption beside "
                                                                 f"them, and caption_strategy {b.caption_strategy} "
                                                                 "leaves them unused",
                           "set caption_strategy to textfile to train on them"))
    out += _caption_tokens(b, folder, captions)

    # sizes and buckets (meets_resolution_requirements, calculate_new_size_by_*)
    res, rtype, minimum = _effective(ctx, b)
    out += _check_sizes(b, res, rtype, minimum)
    crop_square = b.crop and b.crop_aspect == "square"
    kept = [i for i in scan.images if not too_small(i, minimum, rtype, crop_square)]
    if len(kept) < len(scan.images):
        kept_set = set(kept)
        small = [i.path for i in scan.images if i not in kept_set]
        what = "all" if not kept else f"{len(scan.images) - len(kept)} of"
        finding = error if not kept else warning
        out.append(finding(BACKENDS, f"{b.id}.minimum_image_size",
                           f"{what} {len(scan.images)} images are smaller than {minimum:g} "
                           f"({rtype}) and are skipped: {_names(small, folder)}",
                           "use larger images, or lower minimum_image_size / MINIMUM_RESOLUTION"))
    if not kept:
        return out, None
    if rtype == "pixel":
        upscaled = [i for i in kept if min(i.width, i.height) < 0.5 * res]
    else:
        area = (megapixels(res, rtype) or 0) * 1_000_000
        upscaled = [i for i in kept if i.width * i.height < 0.25 * area]
    if upscaled:
        what = "1 image is" if len(upscaled) == 1 else f"{len(upscaled)} images are"
        out.append(warning(str(folder), "", f"{what} under half the training resolution and will be upscaled "
                                            f"(blurry): {_names([i.path for i in upscaled], folder)}",
                           "use larger images or a lower resolution"))
    counts = bucket_counts(kept, res, rtype, crop_square)
    return out, _Dataset(b, len(scan.images), counts, captions)


def _check_run_resolution(ctx: Context, images: list[ImageBackend]) -> list[Finding]:
    """RESOLUTION / RESOLUTION_TYPE set in the config while every image dataset sets its own, and to another value:
    SimpleTuner takes the dataset's (factory.py), so editing the config alone changes nothing that trains."""
    out = []
    for option in ("resolution", "resolution_type"):
        if option not in ctx.run.sources or not ctx.valid(option) or not images:
            continue
        if any(option not in b.model_fields_set for b in images):
            continue  # the config's value applies to that dataset
        mine, theirs = getattr(ctx.cfg.data, option), {b.id: getattr(b, option) for b in images}
        if mine not in theirs.values():
            sets = ", ".join(f"{ident} {_show(value)}" for ident, value in theirs.items())
            out.append(warning(ctx.file, ctx.where(option), f"{_show(mine)} here, but every dataset sets its own "
                               f"{option} ({sets}) and SimpleTuner uses those", f"change {option} in {BACKENDS} "
                               "(or make the two equal)"))
    return out


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _check_sizes(b: ImageBackend, res: float, rtype: str, minimum: float | None) -> list[Finding]:
    """Dataset size settings SimpleTuner 4.10.1 rejects (data_backend/config/validators.py, factory.py)."""
    out = []
    if rtype == "area" and res > 20:
        out.append(error(BACKENDS, f"{b.id}.resolution", f"resolution_type area reads {res:g} as megapixels",
                         f"use resolution_type pixel_area with {res:g}, or area with ~1.0"))
    if rtype == "pixel_area" and not float(res).is_integer():
        out.append(error(BACKENDS, f"{b.id}.resolution", f"pixel_area needs a whole pixel edge, not {res!r}",
                         "write e.g. 1024"))
    if rtype != "area" and int(res) % keys.SD3_BUCKET_ALIGNMENT:
        low = int(res) // keys.SD3_BUCKET_ALIGNMENT * keys.SD3_BUCKET_ALIGNMENT
        out.append(warning(BACKENDS, f"{b.id}.resolution", f"{res:g} is not a multiple of 64 (SD3 buckets are "
                                                           "aligned to 64 px)",
                           f"use {low or keys.SD3_BUCKET_ALIGNMENT} or {low + keys.SD3_BUCKET_ALIGNMENT}"))
    if minimum and rtype != "pixel" and minimum_megapixels(minimum, rtype) > 5:
        out.append(error(BACKENDS, f"{b.id}.minimum_image_size", f"{minimum:g} is read as megapixels for an area "
                                                                 "dataset; SimpleTuner refuses values above 5",
                         "use e.g. 0.25, or resolution_type pixel_area with a pixel edge"))
    if b.maximum_image_size and not b.target_downsample_size:
        out.append(error(BACKENDS, f"{b.id}.maximum_image_size", "needs target_downsample_size too",
                         "add target_downsample_size, or remove maximum_image_size"))
    for name in ("maximum_image_size", "target_downsample_size"):
        value = getattr(b, name)
        if not value:
            continue
        mp = minimum_megapixels(value, rtype)
        if rtype == "pixel" and value < 512:
            out.append(error(BACKENDS, f"{b.id}.{name}", f"{value:g} is below SimpleTuner's minimum of 512 px",
                             "use at least 512"))
        elif rtype != "pixel" and mp >= 20:
            out.append(error(BACKENDS, f"{b.id}.{name}", f"{value:g} is {mp:g} megapixels; SimpleTuner needs < 20",
                             "use a smaller value"))
    if b.crop and b.crop_aspect in ("random", "closest") and not b.crop_aspect_buckets:
        out.append(error(BACKENDS, f"{b.id}.crop_aspect", f"crop_aspect {b.crop_aspect} needs crop_aspect_buckets",
                         "add e.g. \"crop_aspect_buckets\": [1.0, 0.75, 1.33], or use square or preserve"))
    return out


def _caption_tokens(b: ImageBackend, folder: Path, captions: set[str]) -> list[Finding]:
    over_t5 = sorted(c for c in captions if estimate_t5_tokens(c) > T5_MAX_TOKENS)
    over_clip = sorted(c for c in captions if estimate_clip_tokens(c) > CLIP_MAX_TOKENS)
    out = []
    if over_t5:
        out.append(warning(BACKENDS, f"{b.id}.caption_strategy",
                           f"{len(over_t5)} captions exceed about {T5_MAX_TOKENS} T5 tokens (SD3 training cuts "
                           f"the rest), e.g. {over_t5[0][:60]!r}...", "shorten them"))
    if over_clip:
        out.append(warning(BACKENDS, f"{b.id}.caption_strategy",
                           f"{len(over_clip)} captions exceed CLIP's {CLIP_MAX_TOKENS} tokens (CLIP cuts the rest; "
                           f"T5 reads up to {T5_MAX_TOKENS}), e.g. {over_clip[0][:60]!r}...",
                           "put the important words first"))
    return out


def _bucket_name(bucket: tuple[int, int]) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def _check_batches(ctx: Context, datasets: list[_Dataset]) -> list[Finding]:
    """Buckets against the batch: SimpleTuner prunes buckets smaller than the batch (only when a minimum image size
    is set), then refuses to start when a bucket cannot fill batch x accumulation x GPUs
    (metadata/backends/base.py ``_prune_small_buckets`` and ``split_buckets_between_processes``)."""
    cfg = ctx.cfg
    if cfg is None or not datasets or not ctx.valid("train_batch_size", "gradient_accumulation_steps"):
        return []
    out: list[Finding] = []
    bs, accum = cfg.optim.train_batch_size, cfg.optim.gradient_accumulation_steps
    effective = bs * accum * ctx.gpus
    ctx.summary.effective_batch = effective
    batch_text = f"{ctx.key('train_batch_size')}={bs}"
    if accum > 1:
        batch_text += f" x {ctx.key('gradient_accumulation_steps')}={accum}"
    if ctx.gpus > 1:
        batch_text += f" x {ctx.gpus} GPUs"
    oversubscribe = ctx.flag("allow_dataset_oversubscription")
    pruning = not ctx.flag("disable_bucket_pruning")
    for d in datasets:
        b, mult = d.backend, d.backend.repeats + 1
        _, _, minimum = _effective(ctx, b)
        before = dict(d.usable)
        if minimum and pruning:
            pruned = {k: n for k, n in d.usable.items() if n * mult < bs}
            if pruned:
                lost = sum(pruned.values())
                listed = ", ".join(f"{_bucket_name(k)} ({n})" for k, n in sorted(pruned.items()))
                if lost < sum(d.usable.values()):
                    out.append(warning(BACKENDS, b.id, f"{lost} images sit in aspect buckets smaller than the batch "
                                                       f"({batch_text}) and are dropped: {listed}",
                                       "crop to square (crop true, crop_aspect square), add images, or lower "
                                       f"{ctx.key('train_batch_size')}"))
                for k in pruned:
                    del d.usable[k]
        failing = {k: n for k, n in d.usable.items() if n * mult < effective}
        if not d.usable:
            listed = ", ".join(f"{_bucket_name(k)}: {n}" for k, n in sorted(before.items()))
            out.append(error(ctx.file, ctx.where("train_batch_size"),
                             f"dataset {b.id!r}: no aspect bucket fills one batch of {batch_text} "
                             f"({listed}{f', x {mult} with repeats' if mult > 1 else ''}); SimpleTuner drops every "
                             "image",
                             f"lower {ctx.key('train_batch_size')}, add images, or raise repeats in {BACKENDS}"))
        elif failing:
            listed = ", ".join(f"{_bucket_name(k)}: {n} x {mult}" for k, n in sorted(failing.items()))
            message = (f"dataset {b.id!r}: effective batch {effective} ({batch_text}) is larger than aspect "
                       f"bucket{'' if len(failing) == 1 else 's'} {listed}; "
                       "SimpleTuner refuses to start (zero usable batches)")
            if oversubscribe and b.repeats == 0:
                out.append(warning(ctx.file, ctx.where("train_batch_size"), message.replace(
                    "SimpleTuner refuses to start (zero usable batches)", "--allow_dataset_oversubscription repeats "
                                                                          "them to fit")))
            else:
                where = ctx.where("gradient_accumulation_steps") if accum > 1 and bs <= min(failing.values()) * mult \
                    else ctx.where("train_batch_size")
                out.append(error(ctx.file, where, message,
                                 f"lower {ctx.key('train_batch_size')} or {ctx.key('gradient_accumulation_steps')}, "
                                 f"add images, set repeats in {BACKENDS}, or crop to square so images share a bucket"))
    return out


def _summarise(ctx: Context, datasets: list[_Dataset]) -> None:
    """Images, buckets and the step arithmetic of SimpleTuner's trainer (len(sampler) per dataset, / accumulation)."""
    s, cfg = ctx.summary, ctx.cfg
    s.images = sum(d.scanned for d in datasets)
    # images counted once per dataset even when two datasets share a folder: that is what SimpleTuner trains on
    s.usable = sum(sum(d.usable.values()) for d in datasets)
    s.samples_per_epoch = sum(sum(d.usable.values()) * (d.backend.repeats + 1) for d in datasets)
    buckets: Counter = Counter()
    for d in datasets:
        buckets.update({_bucket_name(k): n for k, n in d.usable.items()})
    s.buckets = dict(sorted(buckets.items()))
    if cfg is None or not s.samples_per_epoch or not ctx.valid("train_batch_size", "gradient_accumulation_steps"):
        return
    bs, accum = cfg.optim.train_batch_size, cfg.optim.gradient_accumulation_steps
    batches = sum(math.ceil(sum(d.usable.values()) * (d.backend.repeats + 1) / ctx.gpus / bs)
                  for d in datasets if d.usable)
    per_epoch = max(1, math.ceil(batches / accum))
    s.steps_per_epoch = per_epoch
    if ctx.valid("max_train_steps", "num_train_epochs"):
        steps = cfg.optim.max_train_steps or cfg.optim.num_train_epochs * per_epoch
        if steps:
            s.steps = steps
            s.epochs = round(steps / per_epoch, 2)


def _check_disk(ctx: Context, datasets: list[_Dataset], text: list[TextEmbedsBackend]) -> list[Finding]:
    """VAE latents (16 x H/8 x W/8) and SD3 text embeddings ((77 + 154) x 4096 + pooled 2048) per caption."""
    cfg = ctx.cfg
    if cfg is None or not datasets:
        return []
    width = 2 if cfg.precision.mixed_precision in ("bf16", "fp16") else 4
    need: dict[Path, int] = {}
    for d in datasets:
        latents = sum(n * 16 * (w // 8) * (h // 8) * width for (w, h), n in d.usable.items())
        key = ctx.path(d.backend.cache_dir_vae)
        need[key] = need.get(key, 0) + latents
    captions = set().union(*(d.captions for d in datasets))
    default = next((t for t in text if t.default), text[0] if text else None)
    if default is not None:
        per_caption = ((CLIP_MAX_TOKENS + T5_MAX_TOKENS) * 4096 + 2048) * width
        key = ctx.path(default.cache_dir)
        need[key] = need.get(key, 0) + (len(captions) + 2) * per_caption
    ctx.summary.cache_gb = round(sum(need.values()) / 2**30, 2)
    by_device: dict[int, tuple[Path, int, list[Path]]] = {}
    for path, size in need.items():
        anchor = _existing_ancestor(path)
        if anchor is None:
            continue
        try:
            dev = anchor.stat().st_dev
        except OSError:
            continue
        prev = by_device.get(dev, (anchor, 0, []))
        by_device[dev] = (prev[0], prev[1] + size, prev[2] + [path])
    out = []
    for anchor, size, paths in by_device.values():
        try:
            free = shutil.disk_usage(anchor).free
        except OSError:
            continue
        if free < size * 1.1:  # only then walk the caches: what is already there need not be written again
            size = sum(max(0, need[p] - _folder_size(p)) for p in paths)
        if free < size * 1.1:
            out.append(error(BACKENDS, "cache_dir", f"caches ({', '.join(map(str, paths))}) need about "
                                                    f"{size / 2**30:.1f} GiB but {free / 2**30:.1f} GiB is free",
                             "free disk space or move the cache folders to a larger disk"))
    return out


def _folder_size(path: Path) -> int:
    """Bytes already cached in ``path`` (what is there need not be written again)."""
    total = 0
    if not path.is_dir():
        return 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def gpu_memory_estimate(batch: int, pixels: float, checkpointing: bool, quantised: bool) -> float:
    """Rough peak GB for SD3 Medium LoRA training, fitted to the reference profile's SimpleTuner rows at 1024 px:
    10.8 at batch 1 and 28.0 at batch 4 without gradient checkpointing, 10.6 at batch 1 with it (+0.63 GB per extra
    image, from the plain loop); activations scale with the image area (``pixels`` / 1024²). An int8 base saves ~2 GB.
    """
    base, per_image = (9.97, 0.63) if checkpointing else (5.07, 5.73)
    estimate = base + per_image * batch * pixels / 1024**2 - (2.0 if quantised else 0.0)
    return round(estimate, 1)


def _check_memory(ctx: Context) -> list[Finding]:
    cfg, s = ctx.cfg, ctx.summary
    if cfg is None or not ctx.valid("train_batch_size", "gradient_checkpointing", "base_model_precision"):
        return []
    from sd3tune.manifest import read_manifest

    preset = (read_manifest(ctx.root).get("init") or {}).get("preset")
    s.preset = preset if isinstance(preset, str) else None
    largest = max((w * h for w, h in (map(int, k.split("x")) for k in s.buckets)), default=cfg.data.resolution ** 2)
    s.gpu_memory_gb = gpu_memory_estimate(cfg.optim.train_batch_size, largest, cfg.precision.gradient_checkpointing,
                                          cfg.precision.base_model_precision != "no_change")
    budget = PRESET_GB.get(s.preset or "")
    if budget and s.gpu_memory_gb > budget * 0.95:
        return [warning(ctx.file, ctx.where("train_batch_size"),
                        f"estimated peak GPU memory ~{s.gpu_memory_gb} GB does not fit the {s.preset} preset's card",
                        f"lower {ctx.key('train_batch_size')} or the resolution, or turn gradient checkpointing on "
                        f"(--gradient_checkpointing=true)")]
    return []


RULES: tuple[Callable[[Context], list[Finding]], ...] = (
    check_extra_options, check_traps, check_steps, check_training, check_model, check_paths,
    check_backends, check_environment,
)
