"""Readers of a run's SimpleTuner files: ``config/config.env`` or ``config/config.json`` plus
``config/multidatabackend.json``, into a LoadedRun. Readers report every problem as a Finding and never raise for
user mistakes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sd3tune.config.models import RunConfig
from sd3tune.findings import Finding, at_line, choice_error, error, warning
from sd3tune.simpletuner import envfile, keys
from sd3tune.simpletuner.backends import BACKENDS, NUMBER_ERROR, ImageBackend, TextEmbedsBackend
from sd3tune.simpletuner.catalog import Catalog, load_catalog
from sd3tune.simpletuner.layout import RunPaths
from sd3tune.simpletuner.loaded import LoadedRun, load_json, set_arg


def _coerce_bool_options(args: dict[str, Any], catalog: Catalog) -> None:
    for option, value in list(args.items()):
        opt = catalog.option(option)
        if opt is not None and opt.kind == "bool" and isinstance(value, str):
            parsed = keys.parse_bool_word(value)
            if parsed is not None:
                args[option] = parsed


def _read_env(run: LoadedRun, catalog: Catalog) -> bool:
    """Read config.env into ``run.args``; False when the file itself could not be read."""
    name = keys.ENV_FILE
    try:
        text = run.paths.env.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        run.findings.append(error(name, "", f"not UTF-8 text ({exc.reason} at byte {exc.start})",
                                  "save the file as UTF-8"))
        return False
    except OSError as exc:
        run.findings.append(error(name, "", f"cannot be read: {exc.strerror}", "check the file's permissions"))
        return False
    entries, malformed = envfile.parse_env_text(text)
    run.findings += [_credential(name, at_line(e.key, e.line), e.key) for e in entries if keys.is_credential(e.key)]
    entries = [e for e in entries if not keys.is_credential(e.key)]  # nothing below may echo a secret
    for bad in malformed:
        run.findings.append(error(name, f"line {bad.line}", f"not a KEY=VALUE line, SimpleTuner skips it: {bad.text!r}",
                                  "write KEY='value' or start the line with #"))
    for entry in entries:
        if entry.append and entry.key != keys.EXTRA_ARGS_KEY:
            run.findings.append(error(name, f"line {entry.line}",
                                      f"'+=' makes SimpleTuner treat this line as an append to {entry.key!r}",
                                      "values must not contain '+='; use KEY='value'"))
    first: dict[str, int] = {}
    for entry in entries:
        if entry.key in first and not entry.append:
            run.findings.append(warning(name, at_line(entry.key, entry.line),
                                        f"also set on line {first[entry.key]}; SimpleTuner takes this later value",
                                        "keep one line per key"))
        first.setdefault(entry.key, entry.line)
        if entry.shell_expands:
            run.findings.append(warning(name, at_line(entry.key, entry.line),
                                        "holds $(...), `...` or $VAR outside single quotes: SimpleTuner reads it as "
                                        "text, but a shell that sources config.env runs or expands it",
                                        "single-quote the value, as sd3tune init writes values"))
        if entry.stray_quotes:
            run.findings.append(warning(name, at_line(entry.key, entry.line),
                                        f"unmatched or nested quotes in {entry.raw}: SimpleTuner reads the value as "
                                        f"{entry.value!r}, quotes kept, and a shell that sources config.env reads it "
                                        "otherwise or fails",
                                        "put the whole value in one pair of quotes, as sd3tune init writes values"))
    resolved = envfile.resolve(entries)
    dropped: list[tuple[str, str, str]] = []  # (KEY, option, where) of KEY=false lines SimpleTuner drops
    for key, (value, line) in resolved.items():
        where = at_line(key, line)
        if key == keys.EXTRA_ARGS_KEY:
            continue  # SimpleTuner appends these after every KEY's option (load_env_config): read last, they win
        option = catalog.env_keys.get(key)
        if key in keys.ENV_LOADER_SKIPS:
            skipped = keys.ENV_LOADER_SKIPS[key]
            run.findings.append(error(name, where, f"SimpleTuner's env loader ignores this key (it treats --{skipped} "
                                                   "as an accelerate flag)",
                                      f"add --{skipped}={value} to {keys.EXTRA_ARGS_KEY} instead"))
            continue
        if option is None:
            run.findings.append(error(name, where, "unknown key; SimpleTuner silently ignores it",
                                      _unknown_env_key_hint(key, catalog)))
            continue
        opt = catalog.option(option)
        lowered = value.lower()
        if lowered == "false":
            dropped.append((key, option, where))
            continue
        if lowered == "true" and opt is not None and opt.kind != "bool":
            run.findings.append(error(name, where, f"--{option} takes a value, but 'true' makes SimpleTuner pass it "
                                                   "without one", f"set {key} to a {opt.kind} value"))
            continue
        set_arg(run, option, value, where)
    if keys.EXTRA_ARGS_KEY in resolved:
        value, line = resolved[keys.EXTRA_ARGS_KEY]
        _read_extra_args(run, catalog, value, at_line(keys.EXTRA_ARGS_KEY, line))
    for key, option, where in dropped:
        run.findings.append(_dropped_false_finding(run, catalog, key, option, where))
    return True


def _credential(file: str, where: str, name: str) -> Finding:
    return error(file, where, "a credential in a config file (value not shown): credentials belong in the "
                              "environment, where the trainer reads them", f"remove it from {file} and export "
                              f"{name.upper()} in your shell (or `hf auth login`, `wandb login`)")


def _unknown_env_key_hint(key: str, catalog: Catalog) -> str:
    """The fix for a config.env KEY SimpleTuner does not map: its real key, an extra arg, or the closest key."""
    upper = key.upper()
    if upper != key and upper in catalog.env_keys:
        return f"config.env keys are upper case: rename {key} to {upper}"
    as_option = catalog.option(key.lower())
    if as_option is not None:
        env_key = catalog.env_key_for().get(as_option.name)
        if env_key:
            return f"SimpleTuner's config.env key for --{as_option.name} is {env_key}: rename {key} to {env_key}"
        return f"this option has no config.env key: add --{as_option.name}=VALUE to {keys.EXTRA_ARGS_KEY}"
    close = catalog.closest_env_key(upper)
    if close:
        return f"did you mean {close}?"
    return f"put SimpleTuner options in {keys.EXTRA_ARGS_KEY} as --option=value"


def _dropped_false_finding(run: LoadedRun, catalog: Catalog, key: str, option: str, where: str) -> Finding:
    """SimpleTuner drops a ``KEY=false`` line (only ``true`` emits a flag): say what then decides the option."""
    name = keys.ENV_FILE
    opt = catalog.option(option)
    source = run.sources.get(option)  # TRAINER_EXTRA_ARGS (or another key) setting it, if any
    if source is not None:
        raw = run.args[option]
        state = raw if isinstance(raw, bool) else keys.parse_bool_word(str(raw))
    else:
        state = opt.default if opt is not None else None
    if opt is not None and opt.kind == "bool" and state is True:
        in_extra = source is not None and source.startswith(keys.EXTRA_ARGS_KEY)
        fix = f"set --{option}=false in {source.rsplit(' --', 1)[0]}" if in_extra else \
            f"add --{option}=false to {keys.EXTRA_ARGS_KEY}"
        return error(name, where, f"SimpleTuner drops '{key}=false', so --{option} stays ON "
                                  f"({'set by ' + source if source else 'its default'})", f"remove the line and {fix}")
    if opt is not None and opt.kind == "bool" and state is False:
        return warning(name, where, f"SimpleTuner drops '{key}=false'; --{option} is off "
                                    f"({'set by ' + source + ', not by this line' if source else 'the default'})",
                       "remove the line")
    return warning(name, where, f"SimpleTuner drops '{key}=false', so --{option} keeps "
                                f"{'the value set by ' + source if source else 'its default'}", "remove the line")


def _read_extra_args(run: LoadedRun, catalog: Catalog, value: str, where: str) -> None:
    for word in value.split():
        if not word.startswith("--"):
            run.findings.append(error(keys.ENV_FILE, where, f"{word!r} is not an --option",
                                      "write each option as --option=value"))
            continue
        option, sep, raw = word[2:].partition("=")
        if keys.is_credential(option):
            run.findings.append(_credential(keys.ENV_FILE, f"{where} --{option}", option))
            continue
        opt = catalog.option(option)
        if opt is None:
            close = catalog.closest_option(option)
            run.findings.append(error(keys.ENV_FILE, where, f"unknown SimpleTuner option --{option}",
                                      f"did you mean --{close}?" if close else "see `simpletuner train --help`"))
            continue
        if not sep:
            if opt.kind != "bool":
                run.findings.append(error(keys.ENV_FILE, where, f"--{option} needs a value", f"write --{option}=VALUE"))
                continue
            raw = "true"
        set_arg(run, opt.name, raw, f"{where} --{option}")


# a legacy config.json key SimpleTuner still reads, under its current name
_JSON_LEGACY_KEYS = {"save_total_limit": "checkpoints_total_limit"}


def _read_json_config(run: LoadedRun, catalog: Catalog) -> bool:
    """Read config.json into ``run.args``; False when it could not be read or parsed."""
    name = keys.JSON_FILE
    # json.loads keeps only the last value of a key written twice (as SimpleTuner does), silently: note them
    data = load_json(run, run.paths.json, name, object_pairs_hook=_JsonObject.from_pairs)
    if data is None:
        return False
    if not isinstance(data, dict):
        run.findings.append(error(name, "", "must be a JSON object of option: value", "see `sd3tune init --format json`"))
        return False
    for raw_key in getattr(data, "duplicates", []):
        run.findings.append(warning(name, raw_key, "is written more than once; SimpleTuner uses the last value and "
                                                   "ignores the others", "keep one of them"))
    for raw_key, value in data.items():
        option = raw_key.lstrip("-")
        if keys.is_credential(option):
            run.findings.append(_credential(name, raw_key, option))
            continue
        if option in _JSON_LEGACY_KEYS:  # SimpleTuner's config.json loader renames it
            run.findings.append(warning(name, raw_key, f"an old name of {_JSON_LEGACY_KEYS[option]}; SimpleTuner reads "
                                                       "it as that", f"rename it {_JSON_LEGACY_KEYS[option]}"))
            option = _JSON_LEGACY_KEYS[option]
        opt = catalog.option(option)
        if opt is None:
            close = catalog.closest_option(option)
            run.findings.append(error(name, raw_key, "unknown SimpleTuner option; SimpleTuner ignores it silently",
                                      f"did you mean {close}?" if close else "remove it"))
            continue
        if isinstance(value, str) and opt.kind == "bool" and keys.parse_bool_word(value) is not None:
            # SimpleTuner's config.json reader drops the string "false" and turns "true" into a bare --option; other
            # words ("yes", "0", "off") reach its bool parser as --option=word, which reads them as meant
            if value.strip().lower() == "false":
                default = keys.parse_bool_word(str(opt.default)) is True
                finding = error if default else warning
                effect = ("its default, true, applies" if default
                          else "its default, false, applies, as meant")
                run.findings.append(finding(name, raw_key, f"SimpleTuner drops the string {value!r}, so {effect}",
                                            f"write {raw_key}: false without quotes"))
            value = keys.parse_bool_word(value)  # what was meant, for the other checks
        # SimpleTuner passes each value on as text to its argparse parser: true becomes a bare --option, which an
        # option with a value refuses ("expected one argument"); 2.0 becomes "2.0", which int() refuses
        if isinstance(value, bool) and opt.kind != "bool":
            wanted = "a number" if opt.kind in ("int", "float") else "a value"
            run.findings.append(error(name, raw_key, f"{json.dumps(value)} is not {wanted}; SimpleTuner passes it as "
                                                     f"{'a bare --' + opt.name if value else f'--{opt.name}=false'} "
                                                     "and refuses to start",
                                      f"write {raw_key}: {wanted}"))
            continue
        if isinstance(value, float) and opt.kind == "int" and value.is_integer():  # a fraction: the checks below
            run.findings.append(error(name, raw_key, f"{value!r} is refused by SimpleTuner, which reads this option "
                                                     f"as a whole number (--{opt.name}={value!r}: invalid int value)",
                                      f"write {raw_key}: {int(value)}"))
            value = int(value)  # what was meant, for the other checks
        if value is None:  # SimpleTuner drops a null option: its default applies, whatever the file seems to say
            if opt.name not in keys.REQUIRED_OPTIONS:  # those are reported as "not set"
                default = "leaves it unset" if opt.default is None else f"uses its default {json.dumps(opt.default)}"
                run.findings.append(warning(name, raw_key, f"null: SimpleTuner ignores the key and {default}",
                                            "write a value, or remove the key"))
            continue
        set_arg(run, opt.name, value, raw_key)
    return True


class _JsonObject(dict):
    """A JSON object that remembers the keys written more than once (``json.loads`` keeps only the last value)."""

    duplicates: list[str]

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, Any]]) -> "_JsonObject":
        obj = cls(pairs)
        seen: set[str] = set()
        obj.duplicates = list(dict.fromkeys(k for k, _ in pairs if k in seen or seen.add(k)))
        return obj


def with_simpletuner_defaults(args: dict[str, Any], catalog: Catalog) -> dict[str, Any]:
    """``args`` plus SimpleTuner's default for every mapped option the files leave out (what the run really does),
    except the required ones, which are reported as "not set" instead."""
    out = dict(args)
    for key in keys.KEYS:
        if key.option not in out and key.option not in keys.REQUIRED_OPTIONS:
            opt = catalog.option(key.option)
            out[key.option] = opt.default if opt is not None else None
    return out


def config_from_args(args: dict[str, Any]) -> RunConfig:
    """Validate SimpleTuner options into a RunConfig (raises pydantic's ValidationError)."""
    nested = keys.from_simpletuner_args(args)
    for section, values in nested.items():
        if isinstance(values, dict) and section != "extra":
            nested[section] = {k: v for k, v in values.items() if v is not None or _nullable(section, k)}
    return RunConfig.model_validate(nested)


def _validate_config(run: LoadedRun, catalog: Catalog) -> None:
    for option, hint in keys.REQUIRED_OPTIONS.items():  # without MODEL_NAME an sd3 run silently trains SD3.5
        if option not in run.args:
            key = run.key_for(option, catalog=catalog)
            run.findings.append(error(run.paths_name(), key, "is not set",
                                      hint.format(key=run.key_for(option, located=False, catalog=catalog))))
    try:
        run.config = config_from_args(with_simpletuner_defaults(run.args, catalog))
    except ValidationError as exc:
        for err in exc.errors():
            if err["type"] == "missing":
                continue  # RunConfig's required fields are required options, reported just above
            option = keys.option_for_path(err["loc"])
            where = run.key_for(option, catalog=catalog) if option else ".".join(map(str, err["loc"]))
            run.findings.append(_value_finding(run.paths_name(), where, err))


def _nullable(section: str, name: str) -> bool:
    model = RunConfig.model_fields[section].annotation
    field_info = model.model_fields.get(name)
    return field_info is not None and not field_info.is_required() and "None" in str(field_info.annotation)


def _value_finding(file: str, where: str, err: dict) -> Finding:
    """A pydantic error as a finding; a bad choice names the closest valid one and lists them once."""
    given = err.get("input")
    if err["type"] == "literal_error":
        choices = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
        return choice_error(file, where, str(given), choices)
    return error(file, where, f"{given!r}: {err['msg']}")


def _read_backends(run: LoadedRun) -> None:
    name = keys.BACKENDS_FILE
    if not run.paths.backends.is_file():
        run.findings.append(error(name, "", f"{run.paths.backends} is missing", "run `sd3tune init` to write it"))
        return
    data = load_json(run, run.paths.backends, name)
    if data is None:
        return
    if not isinstance(data, list):
        run.findings.append(error(name, "", "must be a JSON list of datasets", "see `sd3tune init`"))
        return
    run.backend_entries = data
    try:
        run.backends = BACKENDS.validate_python(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = list(err["loc"])
            index = loc[0] if loc else "?"
            ident = data[index].get("id", f"#{index}") if isinstance(index, int) and isinstance(data[index], dict) else index
            path = [str(p) for p in loc[2:]] if len(loc) > 1 else []
            where = f"{ident}" + (f".{'.'.join(path)}" if path else "")
            if err["type"] == "extra_forbidden":
                from difflib import get_close_matches

                model = TextEmbedsBackend if loc[1:2] == ["text_embeds"] else ImageBackend
                close = get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
                run.findings.append(error(name, where, "unknown key; SimpleTuner silently ignores it",
                                          f"did you mean {close[0]}?" if close else "remove it"))
            elif err["type"] == "bool_type" and isinstance(err.get("input"), str):
                run.findings.append(error(name, where, f"the string {err['input']!r} is not a boolean; SimpleTuner "
                                                       "treats any non-empty string as true", "write true or false "
                                                                                              "without quotes"))
            elif err["type"] == "missing":
                run.findings.append(error(name, where, "is required", "see `sd3tune init` for a complete entry"))
            elif err["type"] == NUMBER_ERROR:
                run.findings.append(_number_finding(name, where, err["input"]))
            else:
                run.findings.append(_value_finding(name, where, err))


def _number_finding(file: str, where: str, given: Any) -> Finding:
    """A dataset value that is not a JSON number (a quoted one, typically)."""
    if isinstance(given, str):
        text = given.strip()
        numeric = re.fullmatch(r"-?\d+(\.\d+)?([eE][-+]?\d+)?", text)
        return error(file, where, f"the string {given!r} is not a number; SimpleTuner needs a JSON number here (a "
                                  "quoted resolution or image size fails with TypeError after the models load)",
                     f"write {text} without quotes" if numeric else "write a number without quotes")
    return error(file, where, f"{json.dumps(given) if isinstance(given, (bool, type(None))) else repr(given)} is not "
                              "a number", "write a number")


def read_run(run_dir: str | Path, catalog: Catalog | None = None) -> LoadedRun:
    """Read a run folder into typed models. Problems become findings; nothing raises for a user mistake."""
    catalog = catalog or load_catalog()
    run = LoadedRun(paths=RunPaths(Path(run_dir).expanduser()))
    paths = run.paths
    present = [p for p in (paths.json, paths.toml, paths.env) if p.is_file()]
    if not paths.root.is_dir():
        run.findings.append(error(str(paths.root), "", "run folder does not exist",
                                  "create one with `sd3tune init RUN_DIR --data DATA_DIR`"))
        return run
    if not present:
        run.findings.append(error(str(paths.config_dir), "", "no config.env or config.json",
                                  "create them with `sd3tune init RUN_DIR --data DATA_DIR`"))
        return run
    if len(present) > 1:
        names = " and ".join(p.name for p in present)
        run.findings.append(error(keys.CONFIG_DIR, present[0].name,
                                  f"{names} both exist; SimpleTuner silently reads only {present[0].name} "
                                  "(json > toml > env)", "delete the one you do not use"))
    if paths.toml in present and len(present) == 1:
        run.findings.append(error(keys.TOML_FILE, "", "sd3tune reads config.env or config.json, not TOML",
                                  "convert it, or re-create the run with `sd3tune init`"))
        return run
    run.format = "json" if paths.json in present else "env"
    run.config_read = _read_env(run, catalog) if run.format == "env" else _read_json_config(run, catalog)
    if run.config_read:  # a file that could not be read would only yield made-up follow-on errors
        _coerce_bool_options(run.args, catalog)
        _validate_config(run, catalog)
    _read_backends(run)
    return run
