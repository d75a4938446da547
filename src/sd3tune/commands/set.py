"""`sd3tune set`: change options of an existing run, typed and validated as `init` does, written where SimpleTuner
reads them (``sd3tune.simpletuner.editor``: every other line of config.env untouched), then checked as `check` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sd3tune.checks import CheckReport, check_run
from sd3tune.errors import Sd3tuneError
from sd3tune.fsutil import atomic_write_text
from sd3tune.locks import folder_lock
from sd3tune.simpletuner import keys
from sd3tune.simpletuner.catalog import Catalog, load_catalog
from sd3tune.simpletuner.editor import set_env_option, set_json_option
from sd3tune.simpletuner.reader import config_from_args, read_run, with_simpletuner_defaults
from sd3tune.simpletuner.writer import value_text


def resolve_option(key: str, catalog: Catalog) -> str:
    """The SimpleTuner option a KEY names: a config.env key (LEARNING_RATE) or an option (learning_rate)."""
    if keys.is_credential(key):
        raise Sd3tuneError(f"{key} is a credential: credentials belong in the environment, not in a config file",
                           hint=f"export {key.lstrip('-').upper()} in your shell instead")
    if key in catalog.env_keys:
        return catalog.env_keys[key]
    opt = catalog.option(key) or catalog.option(key.lower())
    if opt is None:
        close = catalog.closest_option(key.lower()) or catalog.closest_env_key(key.upper())
        raise Sd3tuneError(f"unknown option {key!r}: neither a config.env key nor a SimpleTuner option",
                           hint=f"did you mean {close}?" if close else "see `sd3tune show RUN` for the run's options")
    return opt.name


def typed_value(option: str, text: str, args: dict[str, Any], catalog: Catalog) -> Any:
    """``text`` as the option's type, validated by the run's models when sd3tune types the option."""
    opt = catalog.option(option)
    kind = opt.kind if opt else "str"
    value: Any = text
    if kind == "bool":
        value = keys.parse_bool_word(text)
        if value is None:
            raise Sd3tuneError(f"{option}={text!r} is not true or false", hint=f"e.g. {option}=true")
    elif kind in ("int", "float"):
        try:
            value = int(text) if kind == "int" else float(text)
        except ValueError:
            raise Sd3tuneError(f"{option}={text!r} is not {'a whole number' if kind == 'int' else 'a number'}",
                               hint=f"default: {opt.default}" if opt else "") from None
    if opt and opt.choices and str(value) not in opt.choices:
        raise Sd3tuneError(f"{option}={text!r} is not one of {', '.join(opt.choices)}", hint="pick one of those")
    if option == "optimizer" and value not in catalog.optimizers:
        raise Sd3tuneError(f"optimizer {text!r}: SimpleTuner has no such optimizer", hint=catalog.optimizer_hint(text))
    if option in keys.KEY_BY_OPTION:
        try:
            cfg = config_from_args(with_simpletuner_defaults({**args, option: value}, catalog))
        except ValidationError as exc:
            mine = [e for e in exc.errors() if keys.option_for_path(e["loc"]) == option]
            if mine:
                raise Sd3tuneError(f"{option}={text!r}: {mine[0]['msg']}", hint="nothing was written") from None
        else:
            value = keys.to_simpletuner_args(cfg).get(option, value)
    return value


def parse_assignment(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise Sd3tuneError(f"{item!r} is not KEY=VALUE", hint="e.g. sd3tune set runs/art LEARNING_RATE=2e-4")
    return key.strip(), value


def run_set(run_dir: Path, assignments: list[str]) -> tuple[list[tuple[str, Any]], CheckReport]:
    """Set each KEY=VALUE in the run's config (all validated before anything is written), then check the run."""
    catalog = load_catalog()
    run = read_run(run_dir, catalog)
    if run.format not in ("env", "json"):
        raise Sd3tuneError(f"{run_dir} has no config/config.env or config/config.json",
                           hint="create the run with `sd3tune init` first")
    path = run.paths.config_file(run.format)
    text = path.read_bytes().decode("utf-8")  # as is: read_text would turn CRLF line ends into LF
    args, changes = dict(run.args), []
    for item in assignments:
        key, raw = parse_assignment(item)
        option = resolve_option(key, catalog)
        value = typed_value(option, raw, args, catalog)
        args[option] = value
        changes.append((option, value))
        text = set_env_option(text, option, value, catalog) if run.format == "env" else \
            set_json_option(text, option, value)
    with folder_lock(run.paths.root, "set"):  # refused while it trains
        atomic_write_text(path, text)
    return changes, check_run(run.paths.root)


# --- `sd3tune set` on the command line (sd3tune.cli loads it when the command runs or shows its help) ---

from typing import Annotated  # noqa: E402

import typer  # noqa: E402

from sd3tune.checks.render import render_report  # noqa: E402
from sd3tune.cli import command_app  # noqa: E402
from sd3tune.commands.options import RunDir  # noqa: E402

app = command_app()


@app.command("set")
def set_command(
    run_dir: RunDir,
    assignments: Annotated[list[str], typer.Argument(metavar="KEY=VALUE...", help="config.env keys (LEARNING_RATE) "
                                                                                  "or SimpleTuner options (lora_rank).")],
) -> None:
    """Change options of an existing run in place, then check it (everything else in the file is kept).

    \b
    examples:
      sd3tune set runs/art LEARNING_RATE=2e-4 MAX_NUM_STEPS=3000
      sd3tune set runs/art gradient_checkpointing=false report_to=tensorboard
    """
    changes, report = run_set(run_dir, assignments)
    for option, value in changes:
        typer.echo(f"set {option} = {value_text(value)}")
    typer.echo(render_report(report))
    if not report.ok:
        raise typer.Exit(2)
