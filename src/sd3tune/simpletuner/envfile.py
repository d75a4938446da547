"""SimpleTuner's ``config.env`` format: a writer whose output bash and SimpleTuner read identically, and a parser
that mirrors ``simpletuner.helpers.configuration.env_file.parse_env_file`` line for line (tests compare the two).

What SimpleTuner 4.10.1 does with a line (the traps the writer avoids):
- ``#`` starts a comment only at the beginning of a line; ``export`` is skipped; one pair of matching outer quotes
  is removed, nothing is unescaped; the value is split on whitespace and rejoined with one space.
- any line containing ``+=`` anywhere (even inside a quoted value) is an *append* line split at the first ``+=``.
- an empty value is dropped, and so is ``KEY=false`` for a mapped key (only ``true`` emits a flag).

- lines are what Python's text-mode file iteration yields (``for line in open(path)``, universal newlines): they end
  at ``\n``, ``\r`` or ``\r\n`` only. Other separators that ``str.splitlines`` knows (U+2028, U+0085, ``\x0b``,
  ``\x0c``, ``\x1c``-``\x1e``, ...) stay inside the line, where ``strip``/``split`` treat them as whitespace.

So a value is written in single quotes (bash expands nothing inside them). A value containing a single quote is
written in double quotes when nothing in it is special to bash inside double quotes; anything else, and values
that cannot survive the whitespace rejoin (any whitespace but the plain space: newlines, tabs, U+2028, no-break
spaces, ...; repeated or edge spaces), contain a NUL (bash cannot hold one) or ``+=``, is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sd3tune.errors import UnsafeValueError

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LINE_END = re.compile(r"\r\n|\r|\n")  # universal newlines: what ends a line for SimpleTuner's parser
_DOUBLE_QUOTE_SPECIAL = set('$`\\"!')
_SHELL_EXPANSION = re.compile(r"\$[({A-Za-z_]|`")  # $(...), ${...}, $VAR or `...`


def quote_value(key: str, value: str) -> str:
    """Return ``value`` quoted for a config.env line, or raise :class:`UnsafeValueError`."""
    problem = None
    if value == "":
        problem = "is empty (SimpleTuner drops empty values)"
    elif "\0" in value:
        problem = "contains a NUL character (bash cannot hold one)"
    elif any(ch.isspace() and ch != " " for ch in value):
        ch = next(ch for ch in value if ch.isspace() and ch != " ")
        problem = (f"contains a newline, tab or other whitespace character (U+{ord(ch):04X}); SimpleTuner ends the "
                   "line there or reads it as a space")
    elif value != value.strip() or "  " in value:
        problem = "has leading, trailing or repeated spaces (SimpleTuner collapses them)"
    elif "+=" in value:
        problem = "contains '+=' (SimpleTuner reads any such line as an append)"
    if problem is None:
        if "'" not in value:
            return f"'{value}'"
        if not (_DOUBLE_QUOTE_SPECIAL & set(value)):
            return f'"{value}"'
        problem = "mixes a single quote with one of $ ` \\ \" ! (no quoting keeps it literal for both bash and SimpleTuner)"
    raise UnsafeValueError(
        f"config.env: {key} value {value!r} {problem}",
        hint="rephrase the value, or write the run as JSON with --format json",
    )


def format_line(key: str, value: str) -> str:
    if not _KEY_RE.match(key):
        raise UnsafeValueError(f"config.env: {key!r} is not a valid variable name")
    return f"{key}={quote_value(key, value)}"


@dataclass(frozen=True)
class EnvLine:
    key: str
    value: str  # after SimpleTuner's unquoting and whitespace rejoin
    line: int
    append: bool = False
    raw: str = ""  # the value as written, quotes included

    @property
    def shell_expands(self) -> bool:
        """Whether bash sourcing the file would run or expand part of the value (SimpleTuner reads it as text)."""
        return not self.raw.startswith("'") and bool(_SHELL_EXPANSION.search(self.raw))

    @property
    def stray_quotes(self) -> bool:
        """Whether the value has a quote besides one matching outer pair (``'unclosed``, ``closed'``, ``it's``,
        ``'a' 'b'``): SimpleTuner keeps such quotes in the value as text, while bash pairs them up, or cannot source
        the file at all."""
        raw = self.raw
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
            return raw[0] in raw[1:-1]  # the same quote inside: bash ends the quoted part there
        return raw not in ('"', "'") and any(q in raw for q in "\"'")


@dataclass(frozen=True)
class MalformedLine:
    line: int
    text: str


def parse_env_text(text: str) -> tuple[list[EnvLine], list[MalformedLine]]:
    """Parse config.env text exactly as SimpleTuner's ``parse_env_file`` does, keeping line numbers.

    Returns every assignment in order (later ones win, ``append`` ones extend) and the lines SimpleTuner skips.
    """
    entries: list[EnvLine] = []
    malformed: list[MalformedLine] = []
    lines = _LINE_END.split(text)
    if lines and lines[-1] == "":
        lines.pop()  # the text ends with a line end: no further line
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if line.startswith("#") or line == "":
            continue
        if line.startswith("export "):
            line = line[7:]
        if "+=" in line:
            key, value = line.split("+=", 1)
            words = value.strip('"').strip("'").strip().split()
            entries.append(EnvLine(key.strip(), " ".join(words), number, append=True, raw=value.strip()))
        elif "=" in line:
            key, value = line.split("=", 1)
            value = raw = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            elif value in ('"', "'"):
                # SimpleTuner's startswith/endswith test treats a lone quote as an empty quoted value
                value = ""
            entries.append(EnvLine(key.strip(), " ".join(value.split()), number, raw=raw))
        else:
            malformed.append(MalformedLine(number, line))
    return entries, malformed


def resolve(entries: list[EnvLine]) -> dict[str, tuple[str, int]]:
    """Fold parsed lines into ``KEY -> (value, line)`` as SimpleTuner does (appends extend, empty values vanish)."""
    merged: dict[str, tuple[list[str], int]] = {}
    for e in entries:
        words = e.value.split()
        if e.append and e.key in merged:
            merged[e.key] = (merged[e.key][0] + words, e.line)
        else:
            merged[e.key] = (words, e.line)
    return {k: (" ".join(words), line) for k, (words, line) in merged.items() if words}
