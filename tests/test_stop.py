"""Stopping `sd3tune train` means stopped, and every failure is recorded (issue #28): SIGINT, SIGTERM and SIGHUP stop
the real SimpleTuner on the tiny model in one orderly stop; a `kill -9` of sd3tune takes the training with it; a
failure while saving is recorded with SimpleTuner's own error before any stamping."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import child_env
from test_train import _cmdline, _processes_in

from sd3tune.commands.init import run_init
from sd3tune.errors import Sd3tuneError

REPO = Path(__file__).resolve().parents[1]


def _start(run: Path, *, sigint: object = signal.SIG_DFL, **popen) -> subprocess.Popen:
    """`sd3tune train RUN` as a user starts it, SIGINT at ``sigint`` (a script's `cmd &` starts it ignored)."""
    return subprocess.Popen([sys.executable, "-m", "sd3tune", "train", str(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint), **popen)


def _until(condition, proc: subprocess.Popen, seconds: float = 300) -> None:
    """Poll ``condition`` until true (the test fails when sd3tune ends first or it takes ``seconds``)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None and not condition():
        time.sleep(0.1)
    assert proc.poll() is None and condition(), proc.communicate()


def _checkpoint_saved(run: Path, name: str = "checkpoint-2"):
    return lambda: (run / "output" / name / ".guard").is_file()


def _no_processes_within(run: Path, seconds: float) -> dict[int, str]:
    """Wait up to ``seconds`` for every process working in the run folder to end; those left (then killed)."""
    deadline = time.monotonic() + seconds
    while _processes_in(run) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = {pid: _cmdline(pid) for pid in _processes_in(run)}
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def _ended(proc: subprocess.Popen, run: Path) -> str:
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        left = _no_processes_within(run, 3.0)
    assert left == {}, f"still running after sd3tune ended: {left}"
    return err


def _assert_resume_hint(err: str, run: Path) -> None:
    """One error line: the training was interrupted, continue with --resume (the signal may land while SimpleTuner
    saves a checkpoint: the hint then also says to delete that one)."""
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert re.match(r"error: training interrupted(; checkpoint-\d+| while saving checkpoint-\d+, which is incomplete)",
                    line) and f"sd3tune train {run} --resume" in line, line


def _last_training(run: Path) -> dict:
    return json.loads((run / "sd3tune.json").read_text())["trainings"][-1]


@pytest.fixture()
def long_run(tiny_init_options) -> Path:
    tiny_init_options.steps = 100_000
    run_init(tiny_init_options)
    return tiny_init_options.run_dir


def test_kill_9_of_sd3tune_takes_the_training_with_it(long_run):
    # SimpleTuner runs in its own session: a `kill -9` of sd3tune (or of its process group) left it training for
    # 4-16 s, writing checkpoints with sd3tune gone. The launcher dies with sd3tune, train.py with the launcher.
    proc = _start(long_run)
    _until(_checkpoint_saved(long_run), proc)
    trainers = _processes_in(long_run)
    assert len(trainers) >= 2, {pid: _cmdline(pid) for pid in trainers}  # the launcher and train.py
    proc.kill()
    proc.communicate(timeout=60)
    left = _no_processes_within(long_run, 3.0)
    assert left == {}, f"alive 3 s after sd3tune was killed: {left}"


def test_sighup_stops_like_sigterm_even_with_sigint_ignored(long_run):
    # a closed terminal or SSH session (SIGHUP) left SimpleTuner training on its own; started from a script with
    # `cmd &`, SIGINT is ignored and the trainer inherited that: the stop's SIGINT did nothing for 30 s
    proc = _start(long_run, sigint=signal.SIG_IGN)
    _until(_checkpoint_saved(long_run), proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGHUP)
    err = _ended(proc, long_run)
    assert time.monotonic() - sent < 25, err[-2000:]  # the trainer took the SIGINT: no wait for the SIGTERM
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    _assert_resume_hint(err, long_run)
    entry = _last_training(long_run)
    assert entry["status"] == "interrupted" and entry["signal"] == "SIGHUP", entry


def test_one_ctrl_c_that_arrives_twice_is_one_orderly_stop(long_run):
    # `uv run` delivers one Ctrl-C as two SIGINTs 0.2 s apart: sd3tune said only "interrupted", recorded nothing and
    # left SimpleTuner running unsupervised
    proc = _start(long_run, start_new_session=True)
    _until(_checkpoint_saved(long_run), proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.2)  # the gap uv leaves between the two
    os.killpg(proc.pid, signal.SIGINT)
    err = _ended(proc, long_run)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.count("stopping, please wait") == 1, err[-2000:]
    _assert_resume_hint(err, long_run)
    entry = _last_training(long_run)
    assert entry["status"] == "interrupted" and entry["signal"] == "SIGINT", entry
    kept = sorted((long_run / "output").glob("checkpoint-*"))
    from sd3tune.lora import safetensors_metadata

    stamped = [c for c in kept if (c / ".guard").is_file()
               and (safetensors_metadata(c / "pytorch_lora_weights.safetensors") or {}).get("sd3tune.steps")]
    assert stamped, kept  # the stop went on to stamp this training's checkpoints


FAULT = """\
# the disk fills while SimpleTuner saves checkpoint-4 (torch.save's own error), then sd3tune's compat fixes
import runpy

runpy.run_path({site!r})
import torch

_save = torch.save


def save(obj, f, *args, **kwargs):
    if "checkpoint-4" in str(f):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1472 vs 1360")
    return _save(obj, f, *args, **kwargs)


torch.save = save
"""


def test_a_failure_while_saving_is_recorded_with_its_cause_and_stamping_cannot_mask_it(tiny_init_options, tmp_path,
                                                                                     monkeypatch):
    # disk full while SimpleTuner saved a checkpoint: sd3tune said "cannot write .../checkpoint-2/...: No space left
    # on device" (its own stamping of an earlier checkpoint) and the failed training was not in the manifest
    from sd3tune import fsutil
    from sd3tune.commands import train
    from sd3tune.simpletuner.compat import SITE_DIR

    fault = tmp_path / "fault"
    fault.mkdir()
    (fault / "sitecustomize.py").write_text(FAULT.format(site=str(SITE_DIR / "sitecustomize.py")))
    build_launch = train.build_launch

    def faulty_launch(*args, **kwargs):
        plan = build_launch(*args, **kwargs)
        plan.env["PYTHONPATH"] = os.pathsep.join([str(fault), plan.env["PYTHONPATH"]])
        return plan

    write = fsutil.atomic_write_bytes

    def full_disk(path, data):  # sd3tune's own writes into the checkpoints fail as on a full disk
        if "checkpoint-" in str(path):
            raise Sd3tuneError(f"cannot write {path}: No space left on device")
        write(path, data)

    monkeypatch.setattr(train, "build_launch", faulty_launch)
    monkeypatch.setattr(fsutil, "atomic_write_bytes", full_disk)
    tiny_init_options.steps = 6
    run_init(tiny_init_options)
    run = tiny_init_options.run_dir
    said: list[str] = []
    with pytest.raises(Sd3tuneError) as caught:
        train.run_train(train.TrainOptions(run_dir=run), on_status=said.append)
    message = caught.value.message
    assert message.startswith("SimpleTuner exited with code 1: RuntimeError: ") and "unexpected pos" in message, \
        message
    entry = _last_training(run)
    assert entry["status"] == "failed" and "unexpected pos" in entry["error"], entry
    assert any(s.startswith("warning: the checkpoints are not all stamped") and "No space left" in s
               for s in said), said


@pytest.mark.e2e
def test_soak_stop_reports_each_trial(tmp_path, tiny_model):
    (tmp_path / "model").symlink_to(tiny_model)  # the script builds it where there is none (seconds of imports)
    # seed 2: SIGINT 2.6 s after the launch, then the run trained again from the start
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "soak_stop.py"), "--trials", "1", "--seed", "2",
                           "--work", str(tmp_path), "--steps", "4", "--max-delay", "25"],
                          capture_output=True, text=True, env=child_env(), timeout=900)
    lines = proc.stdout.splitlines()
    assert lines and lines[-1].startswith("RESULT "), proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    for key in ("trials", "clean_resumes", "corrupt_checkpoints", "orphans", "lost_steps", "unrecorded_stops"):
        assert f"{key}: {result[key]}" in lines, key
    # one trial proves the script (each costs two trainings); 20 ran by hand, see the README of scripts/
    assert result["trials"] == 1 and result["orphans"] == 0 and result["unrecorded_stops"] == 0, proc.stdout
    assert result["clean_resumes"] == 1 and proc.returncode == 0, proc.stdout
    assert result["signals"] == ["SIGINT"], proc.stdout  # a stop came, and the run was resumed after it


# ------------------------------------------------------------------------------------------------ no training

def test_signals_after_the_first_are_absorbed_and_a_third_ctrl_c_kills():
    from sd3tune.simpletuner.launch import StopSignals

    # sd3tune started with Ctrl-C, kill and hang-up at their defaults (what this test is about): a test worker may
    # hold another handler by now (twice in fresh-clone runs its SIGINT was ignored, so StopSignals rightly kept it
    # ignored and the third Ctrl-C never came). raise_signal: each handler has run before the next line.
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL, signal.SIGHUP: signal.SIG_DFL}
    found = {sig: signal.signal(sig, handler) for sig, handler in defaults.items()}
    try:
        _three_ctrl_c_kill(StopSignals)
    finally:
        for sig, handler in found.items():
            signal.signal(sig, handler)


def _three_ctrl_c_kill(StopSignals) -> None:
    with StopSignals() as signals:
        signal.raise_signal(signal.SIGTERM)  # before the trainer started: held until it has
        with pytest.raises(KeyboardInterrupt):
            signals.started()
        assert signals.state == "stopping" and signals.first == signal.SIGTERM
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGHUP)
        assert not signals.kill and signals.said
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        assert signals.kill  # three SIGINTs within 5 s
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back as it was


def test_a_signal_ignored_when_sd3tune_started_stays_ignored():
    from sd3tune.simpletuner.launch import StopSignals

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
    try:
        with StopSignals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)


LEADER = """\
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(120)"])
print(child.pid, flush=True)
if sys.argv[1] == "exit":  # gone before the child's sitecustomize ran, most likely
    sys.exit(0)
time.sleep(120)
"""


def _running(pid: int) -> bool:
    try:  # a zombie (dead, not yet reaped by its new parent) is not running
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("leader", ["killed", "exit"])
def test_a_process_of_the_launch_dies_with_the_launcher_even_if_orphaned_before_it_started(leader):
    # the launcher's children (train.py) get the parent-death signal from sd3tune's sitecustomize; one whose launcher
    # was already gone when it started ends at once instead of training on its own
    import sd3tune
    from sd3tune.simpletuner.compat import LAUNCHED_ENV, SITE_DIR

    env = {**child_env(), LAUNCHED_ENV: "1",
           "PYTHONPATH": os.pathsep.join([str(SITE_DIR), str(Path(sd3tune.__file__).parents[1])])}
    proc = subprocess.Popen([sys.executable, "-c", LEADER, "exit" if leader == "exit" else "wait"], env=env,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        child = int(proc.stdout.readline())
        if leader == "killed":
            assert proc.stdout.readline().strip() == "ready"  # its sitecustomize ran
            proc.kill()
        proc.wait(timeout=60)
        deadline = time.monotonic() + 3.0
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(child), f"the launch's child {child} outlived its launcher"
    finally:
        with contextlib.suppress(ProcessLookupError, ValueError, UnboundLocalError):
            os.kill(child, signal.SIGKILL)
        proc.kill()
