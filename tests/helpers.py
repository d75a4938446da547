"""Test helpers: run the real `sd3tune` command line in a subprocess, as a user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# A Hugging Face Hub that cannot be reached (nothing listens on port 9), with offline mode off
UNREACHABLE_HUB = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}


def hub_cache_with(folder: Path, repo_id: str, cache: Path) -> Path:
    """Put ``folder`` into ``cache`` (HF_HUB_CACHE) as huggingface_hub would have downloaded the model ``repo_id``."""
    repo, revision = cache / ("models--" + repo_id.replace("/", "--")), "0" * 40
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return cache


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a command the tests run: offline, without SD3TUNE_DEBUG (which turns user errors into
    tracebacks), plus ``extra``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}
    env.pop("SD3TUNE_DEBUG", None)
    return env


def sd3tune(*args: str, env: dict[str, str] | None = None, timeout: float = 600, cwd=None) -> CliResult:
    """Run `sd3tune ARGS` as a user would and return its exit code, stdout and stderr.

    In this process (``sd3tune.cli.main``, the console script's own entry point, with the environment of
    ``child_env`` and stdout/stderr captured): a fresh ``python -m sd3tune`` costs seconds of imports per call. A run
    that names its own ``env`` gets a real subprocess, since libraries read some variables (the Hub's endpoint and
    offline mode) once, at import; so does one given a ``cwd``."""
    if env or cwd is not None:
        return sd3tune_process(*args, env=env, timeout=timeout, cwd=cwd)
    return sd3tune_in_process(*args)


def sd3tune_process(*args: str, env: dict[str, str] | None = None, timeout: float = 600, cwd=None) -> CliResult:
    """`sd3tune ARGS` in a new process (``python -m sd3tune``)."""
    proc = subprocess.run([sys.executable, "-m", "sd3tune", *map(str, args)], capture_output=True, text=True,
                          env=child_env(**(env or {})), timeout=timeout, cwd=cwd)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def sd3tune_in_process(*args: str) -> CliResult:
    """`sd3tune ARGS` through ``sd3tune.cli.main`` in this process: exit code as the process would end (0, or
    SystemExit's code; an escaping exception prints its traceback to stderr and ends with 1, as Python does)."""
    import contextlib
    import io
    import traceback
    from unittest import mock

    from sd3tune.cli import main

    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, child_env(), clear=True), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception:  # noqa: BLE001 - what the interpreter would print for an uncaught exception
            traceback.print_exc(file=err)
            code = 1
    return CliResult(code, out.getvalue(), err.getvalue())


def interrupted(*args: str, when: Callable[[], bool]) -> CliResult:
    """Run `sd3tune ARGS`, press Ctrl-C (SIGINT) as soon as ``when()`` is true, and return how it ended. SIGINT is at
    its default in the child, as in a terminal (a background job of a script starts with it ignored)."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "sd3tune", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not when():
        time.sleep(0.05)  # polls the condition
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return CliResult(proc.returncode, out, err)


def terminal_lines(text: str) -> list[str]:
    """The lines a terminal shows for ``text``: ``\r`` moves back to the line's start, ``ESC[2K`` erases the line,
    what is written after overwrites, ``\n`` ends the line (other escape sequences are dropped)."""
    import re

    lines, line, col = [], [], 0
    for piece in re.split(r"(\r\n|\r|\n|\x1b\[[0-9;?]*[A-Za-z])", text):
        if piece in ("\n", "\r\n"):
            lines.append("".join(line).rstrip())
            line, col = [], 0
        elif piece == "\r":
            col = 0
        elif piece == "\x1b[2K":
            line = [" "] * len(line)
        elif piece and not piece.startswith("\x1b"):
            for ch in piece:
                line[col:col + 1] = [ch]
                col += 1
    if "".join(line).strip():
        lines.append("".join(line).rstrip())
    return lines


def sd3tune_in_terminal(*args: str, columns: int = 100, timeout: float = 600) -> CliResult:
    """`sd3tune ARGS` in a new process whose stdout and stderr are a terminal (a pseudo-terminal ``columns`` wide);
    ``out`` is everything the terminal received, ``err`` is empty."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "sd3tune", *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=follower, stderr=follower, env=child_env())
    os.close(follower)
    received = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the last holder of the terminal closed it
            break
        if not chunk:
            break
        received += chunk
    os.close(leader)
    code = proc.wait(timeout=timeout)
    return CliResult(code, received.decode("utf-8", "replace").replace("\r\n", "\n"), "")


def assert_one_line_user_error(result: CliResult, *needles: str) -> None:
    assert result.code == 2, (result.code, result.out, result.err)
    assert "Traceback" not in result.err and "Traceback" not in result.out
    lines = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def sd3_transformer_inputs(config) -> tuple:
    """Random positional inputs for an SD3 transformer with ``config`` (its config, or ``load_config``'s dict):
    2 latents of 8x8, 5 text tokens, pooled projections, two timesteps."""
    import torch

    return (torch.randn(2, config["in_channels"], 8, 8), torch.randn(2, 5, config["joint_attention_dim"]),
            torch.randn(2, config["pooled_projection_dim"]), torch.tensor([500.0, 20.0]))


def simpletuner_namespace(run: Path, fmt: str):
    """The run's config as SimpleTuner 4.10.1 parses it: its env loader (parse_env_file + load_env_config) or its
    config.json loader, then its own argparse parser."""
    from sd3tune.simpletuner.compat import install

    install()
    from simpletuner.helpers.configuration.cmd_args import get_argument_parser
    from simpletuner.helpers.configuration.env_file import load_env_config, parse_env_file
    from simpletuner.helpers.configuration.json_file import load_json_config

    old_env, old_cwd = dict(os.environ), os.getcwd()
    try:
        os.chdir(run)
        if fmt == "env":
            os.environ.update({k: " ".join(v) for k, v in parse_env_file("config/config.env").items()})
            args = load_env_config()
        else:
            args = load_json_config()
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
    return get_argument_parser().parse_known_args(args)[0]


def sketch(size=(320, 192)):
    """A landscape picture (PIL) no flip or turn leaves the same: a gradient, a red block top left, a blue bar right,
    a yellow disc."""
    import numpy as np
    from PIL import Image, ImageDraw

    w, h = size
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[..., 1] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    pixels[: h // 3, : w // 4] = (230, 20, 20)
    pixels[:, -w // 8:] = (20, 20, 230)
    image = Image.fromarray(pixels)
    ImageDraw.Draw(image).ellipse((w // 3, h // 2, w // 3 + 30, h // 2 + 30), fill=(250, 250, 0))
    return image


def shared_groups(items, shared: dict[str, str]) -> dict:
    """{item: its xdist group} for the items that use a fixture of ``shared`` ({fixture: group}); groups that share
    a test are one group, named by the first of them in alphabetical order."""
    joined: dict[str, str] = {}

    def root(group: str) -> str:
        while joined.get(group, group) != group:
            group = joined[group]
        return group

    used = {item: sorted({shared[f] for f in getattr(item, "fixturenames", ()) if f in shared}) for item in items}
    for groups in used.values():
        for group in groups[1:]:
            first, second = sorted((root(groups[0]), root(group)))
            if first != second:
                joined[second] = first
    return {item: root(groups[0]) for item, groups in used.items() if groups}
