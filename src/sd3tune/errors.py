"""Errors a user can cause: a message, a hint with the fix, and an exit code. `cli.main` prints them as one line."""

from __future__ import annotations


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
        text = " ".join(self.message.split())
        if self.hint:
            text += f" (hint: {' '.join(self.hint.split())})"
        return text


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
