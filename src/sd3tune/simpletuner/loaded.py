"""A run as its readers fill it (``LoadedRun``): the typed models, the SimpleTuner options and where each one is
set, every finding on the way; and the two steps every reader shares: setting an option, loading a JSON file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd3tune.config.models import RunConfig
from sd3tune.findings import Finding, error, warning
from sd3tune.simpletuner import keys
from sd3tune.simpletuner.backends import ImageBackend, TextEmbedsBackend
from sd3tune.simpletuner.catalog import Catalog, load_catalog
from sd3tune.simpletuner.layout import Format, RunPaths


@dataclass
class LoadedRun:
    """A run as read from disk: the typed models (None when invalid) and every finding on the way."""

    paths: RunPaths
    format: Format | None = None
    config: RunConfig | None = None
    backends: list[ImageBackend | TextEmbedsBackend] | None = None
    backend_entries: list[Any] | None = None  # multidatabackend.json as parsed, when it is a JSON list
    args: dict[str, Any] = field(default_factory=dict)  # SimpleTuner options as the files set them
    sources: dict[str, str] = field(default_factory=dict)  # option -> "KEY" / "TRAINER_EXTRA_ARGS --opt" / json key
    findings: list[Finding] = field(default_factory=list)
    config_read: bool = False  # the config file itself could be read and parsed

    def paths_name(self) -> str:
        """The config file's name, for findings."""
        return keys.JSON_FILE if self.format == "json" else keys.ENV_FILE

    def key_for(self, option: str, located: bool = True, catalog: Catalog | None = None) -> str:
        """Where the user sets ``option`` in this run's files. ``located``: the exact entry when the files set it
        (config.env line, TRAINER_EXTRA_ARGS entry or JSON key), else where it would go; otherwise the bare key for
        use inside a message (the env variable, ``--option``, or the JSON key)."""
        if located and option in self.sources:
            return self.sources[option]
        if self.format != "env":
            return option
        env_key = (catalog or load_catalog()).env_key_for().get(option)
        if env_key:
            return env_key
        return f"{keys.EXTRA_ARGS_KEY} --{option}" if located else f"--{option}"

    def output_dir(self) -> Path | None:
        """SimpleTuner's OUTPUT_DIR; a relative one is relative to the run folder (its working directory). None when
        the config could not be read."""
        if self.config is None:
            return None
        out = Path(self.config.paths.output_dir).expanduser()
        return out if out.is_absolute() else self.paths.root / out


# an lr_scheduler alias SimpleTuner still reads, under its current name
_LR_SCHEDULER_ALIASES = {"cosine_with_warmup": "cosine"}


def set_arg(run: LoadedRun, option: str, value: Any, source: str) -> None:
    if option == "lr_scheduler" and isinstance(value, str) and value.strip().lower() in _LR_SCHEDULER_ALIASES:
        meant = _LR_SCHEDULER_ALIASES[value.strip().lower()]
        run.findings.append(warning(run.paths_name(), source, f"SimpleTuner reads {value!r} as {meant!r} (warm-up "
                                                              "from lr_warmup_steps either way)", f"write {meant}"))
        value = meant
    if option in run.args:
        run.findings.append(warning(run.paths_name(), source,
                                    f"--{option} is also set by {run.sources[option]}; this later value wins",
                                    "keep one of them"))
    run.args[option] = value
    run.sources[option] = source


def load_json(run: LoadedRun, path: Path, name: str, object_pairs_hook=None) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as exc:
        if exc.msg.startswith("Unexpected UTF-8 BOM"):  # SimpleTuner's json.load fails on it the same way
            run.findings.append(error(name, "", "starts with a byte-order mark (BOM), which SimpleTuner cannot read",
                                      "save the file as UTF-8 without BOM"))
            return None
        run.findings.append(error(name, f"line {exc.lineno} column {exc.colno}", f"invalid JSON: {exc.msg}",
                                  "fix the syntax (a trailing comma or a missing quote is typical)"))
    except UnicodeDecodeError:
        run.findings.append(error(name, "", "not UTF-8 text", "save the file as UTF-8"))
    except OSError as exc:
        run.findings.append(error(name, "", f"cannot be read: {exc.strerror}", "check the file's permissions"))
    return None
