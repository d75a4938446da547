"""The training's console on stderr: one progress line, and the events of the training above it.

On a terminal the progress line is redrawn in place, cut to the terminal's width; an event line first clears it,
prints itself, then draws the progress line again below it, so the two are never glued together
(``...ETA 00:20SimpleTuner: saving checkpoint-15``). Elsewhere (a log file, a pipe) progress is printed every ~5% and
events as plain lines. One clock: the time since SimpleTuner was launched, labelled ``elapsed`` wherever it shows.
"""

from __future__ import annotations

import shutil
import sys

from sd3tune.simpletuner.launch import Progress

CLEAR = "\r\x1b[2K"  # back to the line's start, then erase the line


def clock(seconds: float) -> str:
    """``MM:SS``, or ``H:MM:SS`` from an hour on."""
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def progress_line(p: Progress) -> str:
    """``step 15/20  loss 0.1234  lr 1.00e-04  1.20 s/step  elapsed 01:10  ETA 00:06``."""
    loss = f"{p.loss:.4f}" if p.loss is not None else "-"
    lr = f"{p.lr:.2e}" if p.lr is not None else "-"
    rate = f"{p.seconds_per_step:.2f} s/step" if p.seconds_per_step else "- s/step"
    elapsed = clock(p.since_launch) if p.since_launch is not None else p.elapsed
    return f"step {p.step}/{p.total}  loss {loss}  lr {lr}  {rate}  elapsed {elapsed}  ETA {p.eta}"


class TrainConsole:
    """Progress (call it with a :class:`Progress`) and events (``status``) on one stream; ``close`` ends an open
    progress line (call it before anything else is printed to the terminal)."""

    def __init__(self, stream=None) -> None:
        self.stream = stream if stream is not None else sys.stderr  # the one in place now (not at import)
        self.tty = self.stream.isatty()
        self.last_pct = -1
        self.open: str | None = None  # the progress line on screen, not yet ended by a line end (terminal only)

    def __call__(self, p: Progress) -> None:
        line = progress_line(p)
        if self.tty:
            width = shutil.get_terminal_size((120, 24)).columns - 1  # a wrapped line could not be cleared
            self.open = line[:max(width, 20)]
            self.stream.write(CLEAR + self.open)
        else:
            pct = 100 * p.step // max(1, p.total)
            if pct // 5 == self.last_pct // 5:
                return
            self.last_pct = pct
            self.stream.write(line + "\n")
        self.stream.flush()

    def status(self, text: str) -> None:
        """An event line, above the progress line."""
        if self.open is not None:
            self.stream.write(CLEAR + text + "\n" + self.open)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.open is not None:
            self.stream.write("\n")
            self.open = None
            self.stream.flush()
