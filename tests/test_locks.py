"""One command per folder (issue #28): `train` holds RUN/.lock, `generate` and `evaluate` their --out folder's; a
second command there is refused at once, naming the holder; a stale lock is taken over; output names are claimed
with O_EXCL; `quickstart` replaces a folder it made; absurd numbers are refused before any model loads."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import assert_one_line_user_error, child_env, interrupted, sd3tune

from sd3tune.commands.init import run_init
from sd3tune.errors import Sd3tuneError
from sd3tune.locks import LOCK_NAME, claim_name, folder_lock


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def _lock_info(folder: Path) -> dict:
    try:
        return json.loads((folder / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------------------------- the lock itself


def test_a_held_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    with folder_lock(tmp_path, "train"):
        info = _lock_info(tmp_path)
        assert info["pid"] == os.getpid() and info["host"] and info["since"] and info["command"].startswith("sd3tune")
        with pytest.raises(Sd3tuneError) as refused:  # another open file: flock refuses it as another process
            with folder_lock(tmp_path, "generate"):
                pass
    line = refused.value.one_line()
    assert f"in use by pid {os.getpid()} on {info['host']} since {info['since']}" in line
    assert "hint: wait for it to finish" in line and "\n" not in line
    assert not (tmp_path / LOCK_NAME).exists()  # released: the folder is as it was
    with folder_lock(tmp_path, "train"):  # and free again
        pass


def test_a_stale_lock_is_taken_over_with_a_note(tmp_path):
    pid = _dead_pid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": "oldhost", "since": "2026-01-01 10:00:00",
                                                  "command": "sd3tune train runs/a"}))
    notes: list[str] = []
    with folder_lock(tmp_path, "train", on_note=notes.append):
        assert _lock_info(tmp_path)["pid"] == os.getpid()
    assert len(notes) == 1 and f"pid {pid} on oldhost since 2026-01-01 10:00:00" in notes[0]
    assert "that process is gone" in notes[0] and "sd3tune train runs/a" in notes[0]
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_created_folder_is_removed_when_nothing_was_written(tmp_path):
    with folder_lock(tmp_path / "new" / "out", "evaluate", create=True):
        assert (tmp_path / "new" / "out" / LOCK_NAME).is_file()
    assert not (tmp_path / "new" / "out").exists()


def test_claimed_names_are_distinct_across_threads(tmp_path):
    (tmp_path / "img.png").write_bytes(b"someone's image")
    claimed: list[Path] = []
    start = threading.Barrier(8)

    def claim() -> None:
        start.wait()
        for _ in range(10):
            claimed.append(claim_name(tmp_path, "img"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(claimed)) == 80 and tmp_path / "img.png" not in claimed
    assert (tmp_path / "img.png").read_bytes() == b"someone's image"



def test_a_ctrl_c_as_a_name_is_claimed_comes_once_the_name_is_listed_for_the_clean_up(tmp_path, monkeypatch):
    # `generate` Ctrl-C'd just after its first name was made (empty) and before it was listed: the empty PNG stayed,
    # and was listed nowhere (seen once in a suite run)
    import signal

    from sd3tune import locks

    made = locks._create_free_name

    def made_then_ctrl_c(*args):
        path = made(*args)
        signal.raise_signal(signal.SIGINT)  # the Ctrl-C, the moment the file exists
        return path

    monkeypatch.setattr(locks, "_create_free_name", made_then_ctrl_c)
    found = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        listed: list[Path] = []
        with pytest.raises(KeyboardInterrupt):
            claim_name(tmp_path, "img", into=listed)
        assert listed == [tmp_path / "img.png"] and listed[0].stat().st_size == 0  # the clean-up knows it
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
        with pytest.raises(KeyboardInterrupt):  # without a list, the Ctrl-C comes where it comes
            claim_name(tmp_path, "img")
    finally:
        signal.signal(signal.SIGINT, found)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-2.png", "img.png"]

# ----------------------------------------------------------------------------------------------- train


def test_a_second_train_of_a_training_run_is_refused_and_the_first_finishes(tiny_init_options):
    tiny_init_options.steps = 100_000  # stopped below once checkpoint-2 exists
    run_init(tiny_init_options)
    run = tiny_init_options.run_dir
    assert sd3tune("train", "--help").code == 0  # the command's imports, before the timed refusals
    seen: dict = {}

    def when() -> bool:
        if "second" not in seen:
            info = _lock_info(run)
            if info and list((run / "logs").glob("train-*.log")):  # the first holds the run and has launched
                seen["holder"] = info
                t = time.monotonic()
                seen["second"] = sd3tune("train", run)
                seen["seconds"] = time.monotonic() - t
                seen["resume"] = sd3tune("train", run, "--resume")
                seen["dry_run"] = sd3tune("train", run, "--dry-run")
        return "second" in seen and (run / "output" / "checkpoint-2").is_dir()

    first = interrupted("train", run, when=when)
    holder = seen["holder"]
    for refused in (seen["second"], seen["resume"]):
        assert_one_line_user_error(refused, f"in use by pid {holder['pid']} on {holder['host']}",
                                   f"since {holder['since']}", f"`sd3tune train {run}`", "kill")
    assert seen["seconds"] <= 2, seen["seconds"]
    assert seen["dry_run"].code == 0, seen["dry_run"].err  # takes no lock: it runs nothing
    assert first.code == 130, first.err[-2000:]
    manifest = json.loads((run / "sd3tune.json").read_text())
    assert [t["status"] for t in manifest["trainings"]] == ["interrupted"]
    assert len(list((run / "logs").glob("train-*.log"))) == 1
    assert not (run / LOCK_NAME).exists()


def test_init_force_is_refused_while_the_run_trains(tiny_init_options):
    run_init(tiny_init_options)
    run = tiny_init_options.run_dir
    before = (run / "config" / "config.env").read_text()
    with folder_lock(run, "train"):
        r = sd3tune("init", run, "--data", tiny_init_options.data, "--force", "--steps", "9")
    assert_one_line_user_error(r, f"{run} is in use by pid {os.getpid()}")
    assert (run / "config" / "config.env").read_text() == before


# ----------------------------------------------------------------------------------------------- generate


def _generate(out: Path, run: Path, *extra: str) -> list[str]:
    return ["generate", "--lora", str(run), "--prompt", "sd3tune-style, a castle", "-n", "2", "--out", str(out),
            "--device", "cpu", *extra]


def test_a_second_generate_into_a_busy_folder_is_refused_and_no_image_is_lost(trained_run, tmp_path):
    out = tmp_path / "samples"
    # the first runs long enough (many steps on the tiny model) to be busy when the second starts
    first = subprocess.Popen([sys.executable, "-m", "sd3tune", *_generate(out, trained_run, "--steps", "40")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None and not _lock_info(out):
        time.sleep(0.05)  # polls the condition
    assert first.poll() is None, first.communicate()
    second = sd3tune(*_generate(out, trained_run, "--steps", "2"))
    assert first.poll() is None, "the first generate ended before the second was refused: raise its --steps"
    assert_one_line_user_error(second, f"{out} is in use by pid {first.pid}", "sd3tune generate")
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    firsts = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.png")}
    assert len(firsts) == 3  # 2 images and the grid
    again = sd3tune(*_generate(out, trained_run, "--steps", "2"))  # the folder is free again: new names
    assert again.code == 0, again.err[-2000:]
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 6 and len([p for p in pngs if not p.name.startswith("grid")]) == 4
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == h for p, h in firsts.items())  # none overwritten
    assert all(p.stat().st_size > 0 for p in pngs) and not (out / LOCK_NAME).exists()


def test_an_evaluate_into_a_locked_folder_is_refused_naming_the_holder(trained_run, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    with folder_lock(out, "evaluate"):
        held = _lock_info(out)
        r = sd3tune("evaluate", trained_run, "--out", out, "--seeds", "1")
    assert_one_line_user_error(r, f"{out.resolve()} is in use by pid {held['pid']}", f"since {held['since']}")
    assert list(out.iterdir()) == []


# ----------------------------------------------------------------------------------------------- quickstart


def test_quickstart_refuses_a_folder_it_did_not_make(tmp_path):
    # (a second run into a folder quickstart made replaces it: tests/test_quickstart.py runs the whole loop twice)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert_one_line_user_error(sd3tune("quickstart", mine), "is not empty", "--force")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


# ----------------------------------------------------------------------------------------------- absurd numbers


@pytest.mark.parametrize("flags, needle", [
    (["--guidance", "nan"], "--guidance nan must be a finite number"),
    (["--guidance", "inf"], "--guidance inf must be a finite number"),
    (["--scale", "nan"], "--scale nan must be a finite number"),
    (["--scale", "inf"], "--scale inf must be a finite number"),
    (["--scale", "-1"], "--scale -1.0 must be a finite number, not negative"),
    (["--shift", "nan"], "--shift nan must be a finite number above 0"),
    (["--shift", "0"], "--shift 0.0 must be a finite number above 0"),
    (["--steps", "99999999999"], "--steps 99999999999 is over 10,000"),
])
def test_generate_refuses_non_finite_numbers_before_loading(tmp_path, flags, needle):
    out = tmp_path / "out"
    r = sd3tune("generate", "--prompt", "a castle", "--model", tmp_path / "no-model", "--out", out, *flags)
    assert_one_line_user_error(r, needle)
    assert not out.exists()


def test_evaluate_refuses_a_non_finite_guidance_before_loading(trained_run, tmp_path):
    r = sd3tune("evaluate", trained_run, "--out", tmp_path / "eval", "--guidance", "nan")
    assert_one_line_user_error(r, "--guidance nan must be a finite number")
    assert not (tmp_path / "eval").exists()


def test_init_and_quickstart_refuse_absurd_step_counts(tmp_path, data_copy):
    r = sd3tune("init", tmp_path / "run", "--data", data_copy, "--steps", "99999999999")
    assert_one_line_user_error(r, "--steps", "less than or equal to 10000000")
    assert not (tmp_path / "run").exists()
    r = sd3tune("quickstart", tmp_path / "demo", "--steps", "99999999999")
    assert_one_line_user_error(r, "--steps 99999999999 is over 10,000,000")
    assert not (tmp_path / "demo").exists()


def test_hints_quote_paths_with_spaces(tmp_path):
    from sd3tune.simpletuner.layout import incomplete_hint

    output = tmp_path / "my run" / "output"
    (output / "checkpoint-2").mkdir(parents=True)
    hint = incomplete_hint(output, tmp_path / "my run")
    assert f"rm -r '{output / 'checkpoint-2'}'" in hint and f"`sd3tune train '{tmp_path / 'my run'}'`" in hint
