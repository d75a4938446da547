"""Findings: one problem (or warning) in a run, with where it is and how to fix it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

_LINE = re.compile(r" \(line (\d+)\)")  # KEY (line N)
_BARE_LINE = re.compile(r"line (\d+)(?: column \d+)?")  # a line that is no KEY=VALUE, or a JSON syntax error


def plural(n: int, word: str, many: str | None = None) -> str:
    """``n`` and ``word`` in the number it takes: "1 image", "2 images" (``many``: an irregular plural)."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def at_line(key: str, line: int) -> str:
    """Where a config.env entry is, as findings show it: ``KEY (line N)``."""
    return f"{key} (line {line})"


@dataclass(frozen=True)
class Finding:
    severity: Literal["error", "warning"]
    file: str  # "config.env", "multidatabackend.json", a data file, or "flags"
    key: str  # the key, line or item at fault
    message: str
    hint: str = ""

    def render(self) -> str:
        where = f"{self.file}:{self.key}" if self.key else self.file
        return f"{where}: {self.message}" + (f" — {self.hint}" if self.hint else "")

    def as_dict(self) -> dict:
        """For --json: the key as the user spells it (null for none, or a whole line) and the line apart (null where
        there is none)."""
        bare = _BARE_LINE.fullmatch(self.key)
        line = bare or _LINE.search(self.key)
        key = None if bare or not self.key else _LINE.sub("", self.key, count=1)
        return {"severity": self.severity, "file": self.file, "key": key, "line": int(line[1]) if line else None,
                "message": self.message, "hint": self.hint}


def error(file: str, key: str, message: str, hint: str = "") -> Finding:
    return Finding("error", file, key, message, hint)


def warning(file: str, key: str, message: str, hint: str = "") -> Finding:
    return Finding("warning", file, key, message, hint)


def choice_error(file: str, key: str, value: str, choices, cutoff: float = 0.6) -> Finding:
    """``value`` is not one of ``choices``: name the closest one, then list them all."""
    from difflib import get_close_matches

    close = get_close_matches(value, list(choices), n=1, cutoff=cutoff)
    hint = (f"did you mean {close[0]}? " if close else "") + f"valid: {', '.join(choices)}"
    return error(file, key, f"{value!r} is not a valid choice", hint)


def errors_in(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]
