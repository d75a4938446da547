"""Rules on the run's options: types and choices of the untyped ones, SimpleTuner's traps, how long to train, LoRA
and prompt sanity, and the base model."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from sd3tune.datascan import CLIP_MAX_TOKENS, T5_MAX_TOKENS, estimate_clip_tokens, estimate_t5_tokens
from sd3tune.defaults import SD3M
from sd3tune.findings import Finding, choice_error, error, warning
from sd3tune.hub import cached_snapshot, hub_token_found
from sd3tune.simpletuner import keys

if TYPE_CHECKING:
    from sd3tune.checks.engine import Context

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SD3_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


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
        out.append(error(f, ctx.where("optimizer"), f"SimpleTuner has no optimizer {name!r}; it refuses to start",
                         ctx.catalog.optimizer_hint(name)))
    bmp = ctx.catalog.option("base_model_precision")
    if ctx.valid("base_model_precision") and bmp and bmp.choices:
        value = cfg.precision.base_model_precision
        if value not in bmp.choices:
            out.append(choice_error(f, ctx.where("base_model_precision"), value, bmp.choices, cutoff=0.5))
        elif value.endswith("-quanto"):
            out.append(warning(f, ctx.where("base_model_precision"),
                               f"{value} is not proven on a GPU: it died at the first training step with torch 2.11 "
                               "before sd3tune's compat fix 19; since, it trains the tiny model on CPU",
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
            and os.environ.get("WANDB_MODE") not in ("offline", "disabled") and not (Path.home() / ".netrc").is_file():
        out.append(warning(f, ctx.where("report_to"), "wandb is selected but no WANDB_API_KEY is set",
                           "export WANDB_API_KEY or run `wandb login`; offline: export WANDB_MODE=offline "
                           "(`wandb sync` uploads later)"))
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


def _check_hub_model(f: str, where: str, name: str, path: Path) -> list[Finding]:
    if cached_snapshot(name):
        return []
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return [error(f, where, f"{name} is no local folder ({path} does not exist) and not in the Hugging Face "
                                "cache, and HF_HUB_OFFLINE is set", "fix the path, or download the model first")]
    if name != SD3M:
        return [warning(f, where, f"no local folder {path}: SimpleTuner will download {name} from the Hub",
                        "if you meant a local folder, fix the path")]
    if not hub_token_found():
        return [warning(f, where, f"{name} is gated and no Hugging Face token was found; the download (~10 GB) "
                                  "will fail", "accept the licence on its Hub page, then `hf auth login`")]
    return []

