"""Writers of a run's SimpleTuner files: ``config/config.env`` or ``config/config.json`` from a RunConfig, and
``config/multidatabackend.json`` from the dataset models.
"""

from __future__ import annotations

import json
from typing import Any

from sd3tune import __version__
from sd3tune.config.models import RunConfig
from sd3tune.errors import UnsafeValueError
from sd3tune.simpletuner import envfile, keys
from sd3tune.simpletuner.backends import ImageBackend, TextEmbedsBackend, dump_backends
from sd3tune.simpletuner.catalog import Catalog, load_catalog


def value_text(value: Any) -> str:
    """A value as config.env writes it (true/false, floats as Python prints them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def extra_arg(option: str, value: Any) -> str:
    """``--option=value`` for TRAINER_EXTRA_ARGS, or UnsafeValueError for a value it cannot hold."""
    text = value_text(value)
    if not text or any(ch.isspace() or ch in "'\"\\$`" for ch in text):
        raise UnsafeValueError(
            f"config.env: --{option} value {text!r} must go in TRAINER_EXTRA_ARGS, which SimpleTuner splits on "
            "spaces and which cannot hold quotes", hint="use a value without spaces or quotes, or --format json")
    return f"--{option}={text}"


def _descriptions() -> dict[str, str]:
    out = {}
    for key in keys.KEYS:
        section, name = key.path.split(".")
        section_model = RunConfig.model_fields[section].annotation
        out[key.option] = section_model.model_fields[name].description or ""
    return out


def render_env(cfg: RunConfig, catalog: Catalog | None = None) -> str:
    """config.env text for ``cfg``: one commented line per setting, the rest in TRAINER_EXTRA_ARGS.

    Options with a config.env key are written as ``KEY='value'``; ``false`` values and options without a key go
    to TRAINER_EXTRA_ARGS as ``--option=value`` (SimpleTuner drops ``KEY=false`` lines).
    """
    catalog = catalog or load_catalog()
    env_key = catalog.env_key_for()
    notes = _descriptions()
    lines = [f"# SimpleTuner {catalog.simpletuner_version} config written by sd3tune {__version__}.",
             "# Check it with `sd3tune check RUN_DIR`; train with `sd3tune train RUN_DIR`.", ""]
    extra: list[str] = []
    for option, value in keys.to_simpletuner_args(cfg).items():
        key = env_key.get(option)
        if key is None or value is False or (isinstance(value, str) and value.lower() == "false"):
            extra.append(extra_arg(option, value))
            continue
        if notes.get(option):
            lines.append(f"# {notes[option]}")
        lines.append(envfile.format_line(key, value_text(value)))
    lines.append("# Options without a config.env key, and every false flag (SimpleTuner drops KEY=false lines).")
    lines.append(envfile.format_line(keys.EXTRA_ARGS_KEY, " ".join(extra)))
    return "\n".join(lines) + "\n"


def render_json(cfg: RunConfig) -> str:
    return json.dumps(keys.to_simpletuner_args(cfg), indent=2) + "\n"


def render_backends(backends: list[ImageBackend | TextEmbedsBackend]) -> str:
    return json.dumps(dump_backends(backends), indent=2) + "\n"


def render_prompt_library(prompts: list[str]) -> str:
    """SimpleTuner's user prompt library (``--user_prompt_library``): each further validation prompt by a name."""
    return json.dumps({f"prompt_{n}": p for n, p in enumerate(prompts, 2)}, indent=2, ensure_ascii=False) + "\n"
