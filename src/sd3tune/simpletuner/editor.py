"""Changing options of an existing run's config in place (`sd3tune set`), as SimpleTuner will read them.

config.env: only what sets the option changes: its ``KEY=`` line (indentation and ``export`` kept), or its word in
TRAINER_EXTRA_ARGS, which SimpleTuner reads last (so it wins); an option set nowhere gets a new line at the end. A
false value goes to TRAINER_EXTRA_ARGS (SimpleTuner drops ``KEY=false`` lines) and its ``KEY=`` line is removed.
Every other line, comments, blank lines and line ends included, stays byte for byte. config.json: the key's value
changes (the file is rewritten as JSON with its keys in order).
"""

from __future__ import annotations

import json
import re
from typing import Any

from sd3tune.errors import Sd3tuneError
from sd3tune.simpletuner import envfile, keys
from sd3tune.simpletuner.catalog import Catalog
from sd3tune.simpletuner.writer import extra_arg, value_text

_LINE = re.compile(r"([^\r\n]*)(\r\n|\r|\n|$)")  # a line and its end, as SimpleTuner's parser splits them
_PREFIX = re.compile(r"^\s*(?:export\s+)?")


def _split(text: str) -> list[list[str]]:
    """[content, line end] per line; the line numbers are parse_env_text's."""
    lines = [[m[1], m[2]] for m in _LINE.finditer(text)]
    if lines and lines[-1] == ["", ""]:
        lines.pop()
    return lines


def _word_option(word: str, catalog: Catalog) -> str | None:
    opt = catalog.option(word[2:].partition("=")[0]) if word.startswith("--") else None
    return opt.name if opt else None


def _append(lines: list[list[str]], content: str) -> None:
    if lines and not lines[-1][1]:  # the last line had no line end
        lines[-1][1] = "\n"
    lines.append([content, "\n"])


def _rewrite(line: list[str], key: str, value: str) -> None:
    line[0] = _PREFIX.match(line[0])[0] + envfile.format_line(key, value)


def set_env_option(text: str, option: str, value: Any, catalog: Catalog) -> str:
    """config.env ``text`` with ``option`` set to ``value`` (see the module's docstring)."""
    lines = _split(text)
    entries, _ = envfile.parse_env_text(text)
    is_false = value_text(value).lower() == "false"
    extra = [e for e in entries if e.key == keys.EXTRA_ARGS_KEY]
    holding = [e for e in extra if any(_word_option(w, catalog) == option for w in e.value.split())]
    key_lines = [e for e in entries if catalog.env_keys.get(e.key) == option]
    if any(e.append for e in holding + key_lines):
        raise Sd3tuneError(f"--{option} is set on a '+=' line of config.env", hint="edit that line by hand")
    env_key = catalog.env_key_for().get(option)
    if holding or is_false or env_key is None:
        target = holding[-1] if holding else next((e for e in reversed(extra) if not e.append), None)
        word = extra_arg(option, value)
        if target is None:
            _append(lines, envfile.format_line(keys.EXTRA_ARGS_KEY, word))
        else:
            words = [w for w in target.value.split() if _word_option(w, catalog) != option]
            at = next((i for i, w in enumerate(target.value.split()) if _word_option(w, catalog) == option), len(words))
            _rewrite(lines[target.line - 1], keys.EXTRA_ARGS_KEY, " ".join([*words[:at], word, *words[at:]]))
        if is_false:  # a KEY=... line would be dropped (false) or overridden: remove it
            for e in key_lines:
                lines[e.line - 1] = ["", ""]
    elif key_lines:
        _rewrite(lines[key_lines[-1].line - 1], key_lines[-1].key, value_text(value))
    else:
        _append(lines, envfile.format_line(env_key, value_text(value)))
    return "".join(content + end for content, end in lines)


def set_json_option(text: str, option: str, value: Any) -> str:
    """config.json ``text`` with ``option`` set to ``value`` (the key as written, if the file has it)."""
    data = json.loads(text)
    key = next((k for k in reversed(list(data)) if k.lstrip("-") == option), option)
    data[key] = value
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
