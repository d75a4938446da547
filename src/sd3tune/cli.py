"""The `sd3tune` command line: the app, its commands, and user errors as one line with exit code 2.

Each command is declared (its options and its printing) by its module in ``sd3tune.commands``, as that module's
Typer ``app``; the module is imported only when its command runs or shows its help, so `sd3tune --help` imports
none of them (they import the config models and the checks: 3x the start-up time), and heavy libraries (torch,
diffusers, SimpleTuner) are imported inside the command that needs them, so `sd3tune check` stays fast too.
Set SD3TUNE_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from sd3tune import __version__
from sd3tune.errors import Sd3tuneError

# Each command (its module in sd3tune.commands) and its line in `sd3tune --help`: the first line of its docstring
# (tests/test_cli.py holds them equal), so that the list imports no command.
COMMANDS = {
    "init": "Scaffold a run: SimpleTuner config.env (or config.json) and multidatabackend.json.",
    "set": "Change options of an existing run in place, then check it (everything else in the file is kept).",
    "show": "Show a run's options as SimpleTuner will read them, each with the line or key that sets it.",
    "check": "Validate a run's config and data before any model loads (exit 0: clean or warnings, 2: errors).",
    "preview": "Write the exact pixels SimpleTuner will encode for each training image, and a contact sheet by bucket.",
    "train": "Train the run with SimpleTuner through `accelerate launch` (one GPU by default).",
    "generate": "Generate images with SD3 Medium (+ a LoRA); PNGs carry their settings in text chunks.",
    "evaluate": "Compare the base model, the LoRA and its checkpoints on a fixed prompt x seed grid (one model load).",
    "export": "Export the LoRA for diffusers, kohya/A1111/Forge and ComfyUI at its trained strength, with a model card.",
    "quickstart": "The whole loop offline in about a minute: tiny random SD3, init, SimpleTuner training, samples.",
}
_SETTINGS = {"add_completion": False, "pretty_exceptions_enable": False, "rich_markup_mode": None}


def command_app() -> typer.Typer:
    """The Typer app that holds the one command of a module in ``sd3tune.commands``, set as `sd3tune` is."""
    return typer.Typer(**_SETTINGS)  # type: ignore[arg-type]


class _Commands(TyperGroup):
    """`sd3tune`'s commands (COMMANDS), each loaded from its module when it runs or shows its help."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: typer.Context, cmd_name: str):
        if cmd_name in COMMANDS and cmd_name not in self.commands:
            module = importlib.import_module(f"sd3tune.commands.{cmd_name}")
            self.commands[cmd_name] = typer.main.get_command(module.app)
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: typer.Context, formatter) -> None:
        """The list in `sd3tune --help`, worded as TyperGroup words it, from COMMANDS: no command is loaded."""
        limit = formatter.width - 6 - max(map(len, COMMANDS))
        with formatter.section("Commands"):
            formatter.write_dl([(name, TyperCommand(name, help=line).get_short_help_str(limit))
                                for name, line in COMMANDS.items()])


app = typer.Typer(name="sd3tune", cls=_Commands, no_args_is_help=True, **_SETTINGS)  # type: ignore[arg-type]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sd3tune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Fine-tune Stable Diffusion 3 Medium with LoRA on your own images (SimpleTuner + diffusers).

    \b
    examples:
      sd3tune quickstart /tmp/demo           # the whole loop offline on a tiny model
      sd3tune init runs/art --data ~/art --trigger myst
      sd3tune check runs/art && sd3tune train runs/art
      sd3tune generate --lora runs/art --prompt "myst, a lighthouse"
    """


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one line and exit code 2 for user errors, tracebacks only with SD3TUNE_DEBUG=1."""
    try:
        code = app(args=argv, prog_name="sd3tune", standalone_mode=False)
        if isinstance(code, int) and code:  # typer.Exit(n) is returned, not raised, without standalone mode
            if code == 130:  # Ctrl-C elsewhere: typer turns it into a bare 130
                typer.echo("interrupted", err=True)
            sys.exit(code)
    except typer.TyperException as exc:  # a usage error (unknown option, missing argument, bad value, ...)
        _usage_error(exc)
    except Sd3tuneError as exc:
        if os.environ.get("SD3TUNE_DEBUG"):
            raise
        typer.echo(f"error: {exc.one_line()}", err=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


def _usage_error(exc: typer.TyperException) -> None:
    """Typer's (vendored click's) usage errors as one line with a hint, exit 2; bare `sd3tune` shows the help."""
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:  # typer checks it by name too
        typer.echo(ctx.get_help())
        sys.exit(exc.exit_code)
    command = ctx.command_path if ctx is not None else "sd3tune"
    error = Sd3tuneError(exc.format_message(), hint=f"see {command} --help")
    typer.echo(f"error: {error.one_line()}", err=True)
    sys.exit(error.exit_code)
