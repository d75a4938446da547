"""config.env writing and parsing: bash and SimpleTuner's own parser must read back exactly what was meant."""

from __future__ import annotations

import subprocess

import pytest

from sd3tune.errors import UnsafeValueError
from sd3tune.simpletuner import envfile

NASTY = [
    "a $(touch {sentinel}) painting",
    "`touch {sentinel}` castle",
    "dragon & knight; touch {sentinel} | cat",
    'a "quoted" word',
    "it's a castle",
    "50% off, #hashtag, <tag> and =equals=",
    "ünïcödé ☃ prompt",
    "back\\slash",
]


@pytest.fixture(scope="module")
def st_parse_env_file():
    from sd3tune.simpletuner.compat import install

    install()
    from simpletuner.helpers.configuration.env_file import parse_env_file

    return parse_env_file


@pytest.mark.parametrize("template", NASTY)
def test_bash_source_executes_nothing_and_reads_back_the_value(tmp_path, template):
    sentinel = tmp_path / "pwned"
    value = template.format(sentinel=sentinel)
    path = tmp_path / "config.env"
    path.write_text(envfile.format_line("VALIDATION_PROMPT", value) + "\n")
    out = subprocess.run(["bash", "-c", f'set -a; source "{path}"; printf %s "$VALIDATION_PROMPT"'],
                         capture_output=True, text=True, check=True)
    assert not sentinel.exists(), "sourcing config.env executed a command"
    assert out.stdout == value


@pytest.mark.parametrize("template", NASTY)
def test_simpletuner_parser_reads_back_the_value(tmp_path, st_parse_env_file, template):
    value = template.format(sentinel=tmp_path / "x")
    path = tmp_path / "config.env"
    path.write_text(envfile.format_line("VALIDATION_PROMPT", value) + "\n")
    assert " ".join(st_parse_env_file(str(path))["VALIDATION_PROMPT"]) == value
    entries, malformed = envfile.parse_env_text(path.read_text())
    assert malformed == [] and envfile.resolve(entries)["VALIDATION_PROMPT"][0] == value


@pytest.mark.parametrize("value, why", [
    ("it's $HOME", "mixes a single quote"),
    ("two  spaces", "repeated spaces"),
    (" edge", "leading"),
    ("line\nbreak", "newline"),
    ("a+=b", "'+='"),
    ("", "empty"),
])
def test_unrepresentable_values_are_refused_with_a_reason(value, why):
    with pytest.raises(UnsafeValueError) as exc:
        envfile.format_line("VALIDATION_PROMPT", value)
    assert why in exc.value.message
    assert exc.value.hint


TRICKY_FILE = """# comment
export MODEL_TYPE=lora
MODEL_NAME="a b"
VALIDATION_PROMPT='x   y'
TRAINER_EXTRA_ARGS='--a=1'
TRAINER_EXTRA_ARGS+=' --b=2'
EMPTY=
this line is malformed
LONE="
  INDENTED = 'v'
"""


def test_our_parser_matches_simpletuners_on_tricky_input(tmp_path, st_parse_env_file):
    path = tmp_path / "config.env"
    path.write_text(TRICKY_FILE)
    theirs = {k: " ".join(v) for k, v in st_parse_env_file(str(path)).items()}
    entries, malformed = envfile.parse_env_text(TRICKY_FILE)
    ours = {k: v for k, (v, _) in envfile.resolve(entries).items()}
    assert ours == {k: v for k, v in theirs.items() if v}
    assert [m.line for m in malformed] == [8]


# Characters str.splitlines() ends a line at but Python's file iteration (SimpleTuner's parser) does not, and other
# whitespace that SimpleTuner's strip/split turns into a plain space.
SEPARATORS = ["\u2028", "\u2029", "\x85", "\x1c", "\x1d", "\x1e", "\x1f", "\x0b", "\x0c", "\xa0", "\u3000"]


def test_our_parser_ends_lines_where_simpletuners_does(tmp_path, st_parse_env_file):
    """SimpleTuner iterates the file in text mode: lines end at \\n, \\r and \\r\\n only (a pasted U+2028 does not)."""
    lines = [f"VALIDATION_PROMPT='a{sep}b'" if i % 2 else f"KEY_{i}=x{sep}y" for i, sep in enumerate(SEPARATORS)]
    text = "\n".join(lines) + "\r\nOLD_MAC='m'\rWINDOWS='w'\r\nbroken\rLAST=1\n"
    path = tmp_path / "config.env"
    path.write_bytes(text.encode("utf-8"))
    theirs = {k: " ".join(v) for k, v in st_parse_env_file(str(path)).items()}
    entries, malformed = envfile.parse_env_text(text)
    assert {k: v for k, (v, _) in envfile.resolve(entries).items()} == {k: v for k, v in theirs.items() if v}
    assert theirs["VALIDATION_PROMPT"] == "a b" and theirs["LAST"] == "1"
    with open(path) as f:  # how SimpleTuner numbers them
        numbered = [line.strip() for line in f]
    assert [(e.line, numbered[e.line - 1].split("=")[0]) for e in entries] == [(e.line, e.key) for e in entries]
    assert [(m.line, m.text) for m in malformed] == [(numbered.index("broken") + 1, "broken")]


@pytest.mark.parametrize("sep", [*SEPARATORS, "\r", "\n", "\t"])
def test_whitespace_other_than_a_space_is_refused(sep):
    with pytest.raises(UnsafeValueError) as exc:
        envfile.format_line("VALIDATION_PROMPT", f"a misty{sep}lighthouse")
    assert f"U+{ord(sep):04X}" in exc.value.message and "--format json" in exc.value.hint


def test_every_value_the_writer_accepts_reads_back_unchanged_in_bash_and_simpletuner(tmp_path, st_parse_env_file):
    chars = [chr(c) for c in [*range(1, 0x20), 0x7F, *range(0x80, 0xA1), 0x1680, *range(0x2000, 0x200C), 0x2028,
                              0x2029, 0x202F, 0x205F, 0x3000, 0xFEFF, 0x1F409]]
    values = {f"K{i}": f"a{ch}b'" if i % 2 else f"a{ch}b" for i, ch in enumerate(chars)}  # both quoting styles
    written = {}
    for key, value in values.items():
        try:
            written[key] = envfile.format_line(key, value)
        except UnsafeValueError:
            continue
    path = tmp_path / "config.env"
    path.write_text("\n".join(written.values()) + "\n", encoding="utf-8")
    keys = list(written)
    script = f'source "{path}"; for k in {" ".join(keys)}; do printf "%s\\0" "${{!k}}"; done'
    out = subprocess.run(["bash", "-c", script], capture_output=True, check=True)
    assert dict(zip(keys, out.stdout.decode("utf-8").split("\0"))) == {k: values[k] for k in keys}
    theirs = {k: " ".join(v) for k, v in st_parse_env_file(str(path)).items()}
    assert theirs == {k: values[k] for k in keys}
    entries, malformed = envfile.parse_env_text(path.read_text(encoding="utf-8"))
    assert malformed == [] and {k: v for k, (v, _) in envfile.resolve(entries).items()} == theirs
    assert len(keys) > 50  # control characters, U+FEFF, emoji...: only whitespace other than the space is refused
