"""The command line as a whole: help, version, and usage mistakes as one line with exit code 2."""

from __future__ import annotations

from sd3tune import __version__

from helpers import assert_one_line_user_error, sd3tune


def test_usage_mistakes_are_one_line_with_a_hint_and_exit_2(tmp_path):
    run = tmp_path / "run"
    cases = [
        (["init", run], "Missing option '--data'", "sd3tune init --help"),
        (["init", run, "--data", tmp_path, "--steps", "many"], "'--steps'", "sd3tune init --help"),
        (["train"], "Missing argument 'RUN_DIR'", "sd3tune train --help"),
        (["check", run, "--verbose"], "No such option: --verbose", "sd3tune check --help"),
        (["generate", "--prompt", "a castle", "--scale", "strong"], "'--scale'", "sd3tune generate --help"),
        (["tune", run], "No such command 'tune'", "sd3tune --help"),
    ]
    for args, *needles in cases:
        assert_one_line_user_error(sd3tune(*args), *needles)
    assert not run.exists()


def test_help_and_version():
    bare = sd3tune()
    assert "Usage: sd3tune" in bare.out and "quickstart" in bare.out and "Traceback" not in bare.err
    for command in ("init", "check", "preview", "train", "generate", "evaluate", "quickstart"):
        shown = sd3tune(command, "--help")
        assert shown.code == 0 and f"Usage: sd3tune {command}" in shown.out, (command, shown)
    assert sd3tune("--version").out.strip() == f"sd3tune {__version__}"


def test_an_error_is_one_line_and_keeps_the_spaces_of_a_quoted_value():
    from sd3tune.errors import Sd3tuneError

    error = Sd3tuneError("VALIDATION_PROMPT value 'a  b' has repeated spaces,\n    which bash would keep", hint="use\n  one")
    assert error.one_line() == "VALIDATION_PROMPT value 'a  b' has repeated spaces, which bash would keep (hint: use one)"


def test_every_command_is_registered_and_listed_without_loading_any(tmp_path):
    """Each module in sd3tune.commands that declares a command (its Typer ``app``) is registered under the name
    of its module, and `sd3tune --help` lists it with the first line of its docstring without importing it."""
    import importlib
    import pkgutil
    import subprocess
    import sys

    import typer

    import sd3tune.commands
    from sd3tune.cli import COMMANDS, app

    declaring = {}
    for info in pkgutil.iter_modules(sd3tune.commands.__path__):
        module = importlib.import_module(f"sd3tune.commands.{info.name}")
        if isinstance(getattr(module, "app", None), typer.Typer):
            declaring[info.name] = module.app
    assert sorted(declaring) == sorted(COMMANDS)
    group = typer.main.get_command(app)
    for name, module_app in declaring.items():
        [command] = module_app.registered_commands
        assert command.name == name
        assert COMMANDS[name] == command.callback.__doc__.strip().splitlines()[0], name
        assert group.get_command(typer.Context(group), name).name == name
    code = ("import sys\nfrom sd3tune.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print([m for m in sys.modules if m.startswith('sd3tune.commands.')])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "[]", proc.stdout + proc.stderr
    assert all(f"  {name}  " in proc.stdout for name in COMMANDS), proc.stdout


def _main(capsys, *args):
    """`sd3tune ARGS` in this process, as the console script runs it (cli.main prints user errors)."""
    import pytest

    from helpers import CliResult
    from sd3tune.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return CliResult(exit_.value.code, captured.out, captured.err)


def _bad_choices(tmp_path):
    """(command line, bad value, the choices) for every option that takes one of fixed values."""
    from sd3tune.commands.evaluate import CHECKPOINT_CHOICES
    from sd3tune.config.presets import PRESETS
    from sd3tune.runtime import DEVICES, DTYPES, OFFLOADS

    init = ["init", tmp_path / "run", "--data", tmp_path]
    generate = ["generate", "--prompt", "a castle"]
    evaluate = ["evaluate", tmp_path / "run"]
    return [
        ([*init, "--preset", "6gb"], "6gb", PRESETS), ([*init, "--format", "yaml"], "yaml", ("env", "json")),
        ([*generate, "--device", "gpu"], "gpu", DEVICES), ([*generate, "--dtype", "fp64"], "fp64", DTYPES),
        ([*generate, "--offload", "gpu"], "gpu", OFFLOADS),
        ([*evaluate, "--device", "tpu"], "tpu", DEVICES), ([*evaluate, "--dtype", "int8"], "int8", DTYPES),
        ([*evaluate, "--checkpoints", "every"], "every", CHECKPOINT_CHOICES),
    ]


def _names_the_choices(line: str, choices) -> bool:
    return ", ".join(choices) in line or " or ".join(choices) in line


def test_a_bad_choice_is_an_sd3tune_error_naming_the_value_and_the_choices(tmp_path):
    from typer.testing import CliRunner

    from sd3tune.cli import app
    from sd3tune.errors import Sd3tuneError

    for args, value, choices in _bad_choices(tmp_path):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert isinstance(result.exception, Sd3tuneError), (args, result.exception, result.output)
        line = result.exception.one_line()
        assert result.exception.exit_code == 2 and repr(value) in line and _names_the_choices(line, choices), line
    assert not (tmp_path / "run").exists()


def test_a_bad_choice_is_one_line_with_exit_2_from_the_command_line(tmp_path, capsys):
    for args, value, choices in _bad_choices(tmp_path):
        result = _main(capsys, *args)
        assert_one_line_user_error(result, repr(value), "(hint: ")
        assert _names_the_choices(result.err, choices), result.err


def test_the_commands_pass_their_choices_on_as_plain_strings(tmp_path, monkeypatch):
    """The Enum options reach the Python API (InitOptions, GenerateOptions, EvaluateOptions) as their str values."""
    from typer.testing import CliRunner

    import sd3tune.commands.evaluate as evaluate
    import sd3tune.commands.generate as generate
    import sd3tune.commands.init as init
    from sd3tune.cli import app

    seen = []

    def record(opts, *args, **kwargs):
        seen.append(opts)
        raise KeyError("stop here")  # the command's options are all the test needs

    for module, name in ((init, "run_init"), (generate, "run_generate"), (evaluate, "run_evaluate")):
        monkeypatch.setattr(module, name, record)
    run, data = str(tmp_path / "run"), str(tmp_path)
    for args, fields in (
            (["init", run, "--data", data, "--preset", "80gb", "--format", "json"],
             {"preset": "80gb", "format": "json"}),
            (["init", run, "--data", data], {"preset": "24gb", "format": "env"}),
            (["generate", "-p", "x", "--device", "cpu", "--dtype", "fp32", "--offload", "sequential"],
             {"device": "cpu", "dtype": "fp32", "offload": "sequential"}),
            (["generate", "-p", "x"], {"device": "auto", "dtype": "auto", "offload": "none"}),
            (["evaluate", run, "--checkpoints", "all", "--device", "cuda", "--dtype", "bf16"],
             {"checkpoints": "all", "device": "cuda", "dtype": "bf16"}),
            (["evaluate", run], {"checkpoints": "latest", "device": "auto", "dtype": "auto"})):
        result = CliRunner().invoke(app, args)
        assert isinstance(result.exception, KeyError), (args, result.exception, result.output)
        got = {key: getattr(seen[-1], key) for key in fields}
        assert got == fields and {type(value) for value in got.values()} == {str}, (args, got)
