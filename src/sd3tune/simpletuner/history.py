"""How a run trained, as SimpleTuner 4.10.1 leaves it on disk: the loss and learning rate of every step, and the
latest validation images.

* Loss per step: SimpleTuner logs no per-step loss to a file of its own unless a tracker (wandb, tensorboard) is on;
  what it always prints is its tqdm progress bar, which `sd3tune train` keeps whole in ``RUN/logs/train-*.log``.
  After each optimizer step the trainer calls ``progress_bar.update(1)`` (the line shows the new step with the
  previous postfix) and then ``progress_bar.set_postfix(step_loss=loss, lr=lr)`` (trainer.py), which redraws the
  line: so the last ``N/total ... step_loss=X`` drawn for step N carries step N's loss. tqdm prints the postfix
  floats with 3 significant digits. A resumed training repeats the steps after its checkpoint: the later log wins.
* Validation images: ``OUTPUT_DIR/validation_images/step_{N}_{shortname}_{index}_{W}x{H}.png`` (or .webp, .jpg:
  ``validation_images.save_images``), as ``layout.validation_images`` finds them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sd3tune.simpletuner.launch import parse_progress
from sd3tune.simpletuner.layout import validation_image_name, validation_images


@dataclass
class LossHistory:
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float | None] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)  # the logs read, oldest first


def loss_history(logs: Iterable[Path]) -> LossHistory:
    """Every step's loss and learning rate from SimpleTuner's logs of a run's trainings, oldest first. A later log
    supersedes the earlier ones from its first step on: it resumed from a checkpoint before it (or started over), so
    the steps trained after that point, by an earlier training, are not in the LoRA's history. Unreadable logs are
    skipped."""
    found: dict[int, tuple[float, float | None]] = {}
    read = []
    for log in logs:
        try:
            text = Path(log).read_bytes().decode("utf-8", "replace")
        except OSError:
            continue
        read.append(str(log))
        steps: dict[int, tuple[float, float | None]] = {}
        for piece in re.split(r"[\r\n]", text):
            if "step_loss=" not in piece:
                continue
            progress = parse_progress(piece)
            if progress is not None and progress.loss is not None and progress.step > 0:
                steps[progress.step] = (progress.loss, progress.lr)  # the last drawn for a step is its own loss
        if steps:
            first = min(steps)
            found = {step: value for step, value in found.items() if step < first}
            found.update(steps)
    ordered = sorted(found.items())
    return LossHistory([s for s, _ in ordered], [v[0] for _, v in ordered], [v[1] for _, v in ordered], read)


def training_logs(logs_dir: Path, recorded: Iterable[str | None] = ()) -> list[Path]:
    """The logs of a run's trainings, oldest first: those its manifest recorded (``recorded``) that exist, else every
    ``train-*.log`` in ``logs_dir`` (their names sort by start time)."""
    listed = [Path(p) for p in recorded if p]
    existing = [p for p in listed if p.is_file()]
    return existing if existing else sorted(logs_dir.glob("train-*.log"))


def latest_validation_images(output_dir: Path) -> tuple[int | None, list[Path]]:
    """The step of the latest validation images SimpleTuner saved in ``output_dir`` and their files (by prompt
    shortname and index); (None, []) when there are none."""
    by_step: dict[int, list[tuple[str, int, Path]]] = {}
    for path in validation_images(output_dir):  # only names that parse
        if path.is_file():
            step, shortname, index = validation_image_name(path.name)
            by_step.setdefault(step, []).append((shortname, index, path))
    if not by_step:
        return None, []
    step = max(by_step)
    return step, [p for _, _, p in sorted(by_step[step])]
