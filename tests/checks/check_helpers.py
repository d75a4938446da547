"""Editing a run that `run_init` wrote, and running `sd3tune check` on it (in-process), for the tests of each rule."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Callable

from typer.testing import CliRunner

from sd3tune.cli import app

runner = CliRunner()

# A catalog case: (id, config format, break(run, data, tmp) -> optional other path to check, strings the output must
# contain)
Case = tuple[str, str, Callable[[Path, Path, Path], Path | None], tuple[str, ...]]


def env_path(run: Path) -> Path:
    return run / "config" / "config.env"


def json_path(run: Path) -> Path:
    return run / "config" / "config.json"


def backends_path(run: Path) -> Path:
    return run / "config" / "multidatabackend.json"


def env_set(run: Path, key: str, value: str) -> None:
    """Set KEY='value' in config.env (replacing the line, or appending one)."""
    text = env_path(run).read_text()
    line = f"{key}='{value}'"
    new, n = re.subn(rf"^{key}=.*$", lambda m: line, text, flags=re.M)
    env_path(run).write_text(new if n else text + line + "\n")


def env_del(run: Path, key: str) -> None:
    text = env_path(run).read_text()
    env_path(run).write_text(re.sub(rf"^{key}=.*\n", "", text, flags=re.M))


def env_line(run: Path, line: str) -> None:
    env_path(run).write_text(env_path(run).read_text() + line + "\n")


def extra_args(run: Path, old: str, new: str) -> None:
    """Edit TRAINER_EXTRA_ARGS (replace ``old`` by ``new``; old '' appends)."""
    text = env_path(run).read_text()
    m = re.search(r"^TRAINER_EXTRA_ARGS='(.*)'$", text, flags=re.M)
    assert m, text
    args = m.group(1)
    args = args.replace(old, new) if old else f"{args} {new}"
    env_path(run).write_text(text[:m.start(1)] + args + text[m.end(1):])


def json_edit(path: Path, fn: Callable) -> None:
    data = json.loads(path.read_text())
    result = fn(data)
    path.write_text(json.dumps(data if result is None else result, indent=2))


def image_backend(data: list) -> dict:
    return next(b for b in data if b.get("dataset_type") != "text_embeds")


def backend_set(run: Path, **values) -> None:
    json_edit(backends_path(run), lambda d: image_backend(d).update(values))


def check(run: Path, *args: str, env: dict | None = None):
    start = time.perf_counter()
    result = runner.invoke(app, ["check", str(run), *args], env=env)
    elapsed = time.perf_counter() - start
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result, elapsed


def section(output: str, kind: str) -> str:
    """The finding lines under the "N error(s):" (or warning) heading."""
    lines, inside = [], False
    for line in output.splitlines():
        if re.match(rf"^\d+ {kind}s?:$", line):
            inside = True
            continue
        if inside and not line.startswith("  "):
            inside = False
        if inside:
            lines.append(line)
    return "\n".join(lines)


def assert_fails_naming_the_culprit(make_run, tmp_path: Path, fmt: str, breaker: Callable,
                                    needles: tuple[str, ...]) -> None:
    """Break a valid run as a catalog case says: `check` exits 2, naming each needle among the errors, in seconds."""
    run, data = make_run(fmt)
    other = breaker(run, data, tmp_path)
    target = other if isinstance(other, Path) else run
    result, elapsed = check(target)
    assert result.exit_code == 2, result.output
    errors = section(result.output, "error")
    for needle in needles:
        assert needle in errors, f"{needle!r} not among the errors:\n{result.output}"
    assert "check failed" in result.output
    assert elapsed < 5, f"check took {elapsed:.1f} s"
