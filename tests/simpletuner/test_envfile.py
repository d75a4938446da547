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
