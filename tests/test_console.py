"""The training console (console.py) as a terminal shows it, and as a log file or pipe gets it."""

from __future__ import annotations

import io

from helpers import terminal_lines

from sd3tune.console import TrainConsole, clock
from sd3tune.simpletuner.launch import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def progress(step: int, total: int = 20, loss: float | None = 0.1234, since_launch: float | None = 70.2) -> Progress:
    # tqdm's own elapsed (00:09) counts from the first step; the console shows its own clock, since the launch
    return Progress(step, total, "00:09", "00:20", 1.2, loss, 1e-4 if loss is not None else None, since_launch)


def test_an_event_during_training_gets_its_own_line_above_the_progress_line():
    # a terminal showed `step 15/20 ... ETA 00:20SimpleTuner: saving checkpoint-15 (70 s)`
    term = Terminal()
    console = TrainConsole(term)
    console(progress(14))
    console(progress(15))
    console.status("SimpleTuner: saving checkpoint-15, elapsed 01:10")
    console(progress(16, since_launch=75))
    console.close()
    print("error: the next line starts on a line of its own", file=term)
    assert terminal_lines(term.getvalue()) == [
        "SimpleTuner: saving checkpoint-15, elapsed 01:10",
        "step 16/20  loss 0.1234  lr 1.00e-04  1.20 s/step  elapsed 01:15  ETA 00:20",
        "error: the next line starts on a line of its own",
    ]


def test_the_progress_line_stays_below_the_events_after_the_last_step():
    term = Terminal()
    console = TrainConsole(term)
    console(progress(20))
    console.status("validation image at step 20: output/validation_images/step_20_validation_0_1024x1024.png")
    console(progress(20, loss=0.2))  # SimpleTuner's last update of the step
    console.close()
    console.close()  # twice: no empty line
    lines = terminal_lines(term.getvalue())
    assert lines[0].startswith("validation image at step 20: ")
    assert lines[1:] == ["step 20/20  loss 0.2000  lr 1.00e-04  1.20 s/step  elapsed 01:10  ETA 00:20"]
    assert term.getvalue().endswith("\n")


def test_a_progress_line_is_cut_to_the_terminals_width(monkeypatch):
    # a line that wraps cannot be erased in place: every redraw would leave a copy behind
    monkeypatch.setenv("COLUMNS", "40")
    term = Terminal()
    console = TrainConsole(term)
    console(progress(1))
    console(progress(2))
    console.close()
    assert terminal_lines(term.getvalue()) == ["step 2/20  loss 0.1234  lr 1.00e-04  1."]  # 39: no wrap


def test_a_log_gets_whole_lines_every_five_percent_with_the_same_clock():
    log = io.StringIO()
    console = TrainConsole(log)
    for step in range(0, 21):
        console(progress(step, since_launch=60 + step))
        if step == 10:
            console.status("SimpleTuner: saving checkpoint-10, elapsed 01:10")
    console.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    assert lines[11] == "SimpleTuner: saving checkpoint-10, elapsed 01:10"
    assert lines[10] == "step 10/20  loss 0.1234  lr 1.00e-04  1.20 s/step  elapsed 01:10  ETA 00:20"
    assert len(lines) == 22


def test_before_the_first_loss_the_line_says_so_and_the_clock_counts_hours():
    assert clock(59.9) == "00:59" and clock(3 * 3600 + 61) == "3:01:01"
    term = Terminal()
    console = TrainConsole(term)
    console(progress(0, loss=None, since_launch=None))
    assert terminal_lines(term.getvalue()) == ["step 0/20  loss -  lr -  1.20 s/step  elapsed 00:09  ETA 00:20"]
