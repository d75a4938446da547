"""Running a benchmark script as a user would (a subprocess) and reading its RESULT line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import child_env

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
NOT_ACCEPTANCE = "tiny/CPU: not an acceptance number"


def run_script(name: str, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                          env=child_env(), timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(lines[-1][len("RESULT "):]) if lines else {}
    return proc, result


def positive(result: dict, key: str) -> float:
    value = result.get(key)
    assert isinstance(value, (int, float)) and value > 0, (key, value)
    return value


def assert_cpu_profile(profile: dict, steps: int) -> None:
    """A step profile (step_profile.py's JSON) of ``steps`` steps on this GPU-less machine."""
    assert profile["steps"] == steps and profile["device"] == "cpu"
    assert profile["wall_s_per_step"] > 0 and sum(profile["cpu_ops_per_step"].values()) > 100
    assert profile["gpu"]["kernels_per_step"] == 0 and profile["sync_sites"] == []  # no GPU here
