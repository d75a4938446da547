"""Errors a user can cause: a message, a hint with the fix, and an exit code. `cli.main` prints them as one line."""

from __future__ import annotations

import re


class Sd3tuneError(Exception):
    """A problem the user can fix. Printed as ``error: MESSAGE (hint: HINT)``; exit code 2 unless stated."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def one_line(self) -> str:
        text = _one_line(self.message)
        if self.hint:
            text += f" (hint: {_one_line(self.hint)})"
        return text


def _one_line(text: str) -> str:
    """Line breaks (and the indentation around them) become one space; other spaces stay, so a quoted value shows
    as it is."""
    return re.sub(r"[ \t]*[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+[ \t]*", " ", text).strip()


class ConfigError(Sd3tuneError):
    """A configuration file or flag value is invalid. Carries every finding, not only the first."""

    def __init__(self, message: str, hint: str | None = None, findings: list | None = None) -> None:
        super().__init__(message, hint)
        self.findings = list(findings or [])


class UnsafeValueError(Sd3tuneError):
    """A value cannot be written to config.env so that bash and SimpleTuner both read it back unchanged."""


class RefuseOverwriteError(Sd3tuneError):
    """A file the user owns exists and --force was not given."""


class TrainingFailed(Sd3tuneError):
    """SimpleTuner exited non-zero; the exit code follows the child's."""
