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
    for command in ("init", "check", "train", "generate", "evaluate", "quickstart"):
        shown = sd3tune(command, "--help")
        assert shown.code == 0 and f"Usage: sd3tune {command}" in shown.out, (command, shown)
    assert sd3tune("--version").out.strip() == f"sd3tune {__version__}"


def test_an_error_is_one_line_and_keeps_the_spaces_of_a_quoted_value():
    from sd3tune.errors import Sd3tuneError

    error = Sd3tuneError("VALIDATION_PROMPT value 'a  b' has repeated spaces,\n    which bash would keep", hint="use\n  one")
    assert error.one_line() == "VALIDATION_PROMPT value 'a  b' has repeated spaces, which bash would keep (hint: use one)"
