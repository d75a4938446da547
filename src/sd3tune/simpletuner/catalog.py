"""SimpleTuner's option catalog: every command-line option of the pinned release, read without importing it.

``catalog.json`` (next to this file) is generated from SimpleTuner's own argument parser and env-key map by
``scripts/update_simpletuner_catalog.py``; a test regenerates it from the installed SimpleTuner and fails when
they differ, so a version bump cannot silently change what `sd3tune check` believes.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from sd3tune.simpletuner import keys

CATALOG_PATH = Path(__file__).with_name("catalog.json")


@dataclass(frozen=True)
class Option:
    """One SimpleTuner option, as its argparse parser defines it."""

    name: str  # canonical name without dashes, e.g. "lora_rank"
    kind: str  # "bool" | "int" | "float" | "str" | "report_to"
    default: Any
    choices: tuple[str, ...] | None
    aliases: tuple[str, ...]  # other spellings without dashes


@dataclass
class Catalog:
    simpletuner_version: str
    options: dict[str, Option]
    env_keys: dict[str, str]  # config.env KEY -> option name
    optimizers: tuple[str, ...]  # names --optimizer accepts in the environment the catalog was built in

    def __post_init__(self) -> None:
        self._aliases = {alias: opt for opt in self.options.values() for alias in opt.aliases}
        self._env_key_for: dict[str, str] = {}
        for key, name in self.env_keys.items():
            self._env_key_for.setdefault(name, key)

    def option(self, name: str) -> Option | None:
        name = name.lstrip("-")
        if name in self.options:
            return self.options[name]
        return self._aliases.get(name)

    def env_key_for(self) -> dict[str, str]:
        """Option name -> the config.env KEY SimpleTuner maps to it (the first in sorted order)."""
        return self._env_key_for

    def environment_variables(self) -> set[str]:
        """Every variable SimpleTuner reads from the process environment: its config.env keys (read from the
        environment too) and the ones that pick the config file."""
        return set(self.env_keys) | set(keys.CONFIG_ENV_VARS)

    def closest_option(self, name: str) -> str | None:
        match = difflib.get_close_matches(name.lstrip("-"), list(self.options), n=1, cutoff=0.6)
        return match[0] if match else None

    def optimizer_hint(self, name: str) -> str:
        """The fix for an optimizer name SimpleTuner does not have: the closest names, then every valid one."""
        close = difflib.get_close_matches(name, self.optimizers, n=3, cutoff=0.5)
        hint = "use torch-adamw (fast, tuned default) or adamw_bf16" if name.lower() in ("adamw", "adam") else (
            f"did you mean {' or '.join(close)}?" if close else "use torch-adamw")
        return hint + f"; valid: {', '.join(self.optimizers)}"

    def closest_env_key(self, key: str) -> str | None:
        match = difflib.get_close_matches(key, [*self.env_keys, "TRAINER_EXTRA_ARGS"], n=1, cutoff=0.6)
        return match[0] if match else None


@lru_cache(maxsize=1)
def load_catalog() -> Catalog:
    raw = json.loads(CATALOG_PATH.read_text())
    options = {
        name: Option(name=name, kind=o["kind"], default=o.get("default"),
                     choices=tuple(o["choices"]) if o.get("choices") else None, aliases=tuple(o.get("aliases", ())))
        for name, o in raw["options"].items()
    }
    return Catalog(simpletuner_version=raw["simpletuner_version"], options=options, env_keys=raw["env_keys"],
                   optimizers=tuple(raw["optimizers"]))


def build_catalog_from_simpletuner() -> dict[str, Any]:
    """Read the installed SimpleTuner's parser and env map (imports SimpleTuner: ~20 s, maintainers only)."""
    from importlib.metadata import version

    from sd3tune.simpletuner.compat import install as install_compat

    install_compat()
    from simpletuner.helpers.configuration.cmd_args import get_argument_parser
    from simpletuner.helpers.configuration.env_file import env_to_args_map
    from simpletuner.helpers.training.optimizer_param import optimizer_choices

    options: dict[str, Any] = {}
    for action in get_argument_parser()._actions:
        longs = [s[2:] for s in action.option_strings if s.startswith("--")]
        if not longs or longs[0] == "help":
            continue
        type_name = getattr(action.type, "__name__", "str")
        kind = {"int": "int", "float": "float", "_parse_bool_flag": "bool",
                "_parse_validation_prompt_library_flag": "bool", "_parse_report_to_arg": "report_to"}.get(type_name, "str")
        default = action.default
        if not isinstance(default, (str, int, float, bool, type(None))):
            default = str(default)
        options[longs[0]] = {
            "kind": kind,
            "default": default,
            "choices": [str(c) for c in action.choices] if action.choices else None,
            "aliases": longs[1:],
        }
    env_keys = {}
    for key, arg in env_to_args_map.items():
        name = arg.lstrip("-").split("=", 1)[0]
        if name in options and "=" not in arg and key not in keys.ENV_LOADER_SKIPS:
            env_keys[key] = name
    from simpletuner.helpers.models.registry import LazyModelClass, ModelRegistry

    from sd3tune.simpletuner.compat.unloaded_model_families import capabilities

    ModelRegistry._load_metadata()
    classes = {family: ModelRegistry.get(family) for family in sorted(ModelRegistry._metadata)}
    families = {family: capabilities(cls.get_real_class() if isinstance(cls, LazyModelClass) else cls)
                for family, cls in classes.items()}
    return {"simpletuner_version": version("simpletuner"), "options": dict(sorted(options.items())),
            "env_keys": dict(sorted(env_keys.items())), "optimizers": sorted(optimizer_choices),
            "model_families": families}


def dump_catalog(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, sort_keys=False) + "\n"
