"""SimpleTuner's run layout: where a run's files live (its config folder, output, caches and logs), the run folder
above a path, the ``checkpoint-N`` folders SimpleTuner writes into the output (complete once their ``.guard``
mark is written), with what `sd3tune train` makes of them, and the validation images it samples while training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from shlex import quote
from pathlib import Path
from typing import Literal

from sd3tune.simpletuner import keys

Format = Literal["env", "json"]


@dataclass(frozen=True)
class RunPaths:
    """Where a run's files live. SimpleTuner runs with ``root`` as its working directory."""

    root: Path

    @property
    def config_dir(self) -> Path:
        return self.root / keys.CONFIG_DIR

    @property
    def env(self) -> Path:
        return self.config_dir / keys.ENV_FILE

    @property
    def json(self) -> Path:
        return self.config_dir / keys.JSON_FILE

    @property
    def toml(self) -> Path:
        return self.config_dir / keys.TOML_FILE

    @property
    def backends(self) -> Path:
        return self.config_dir / keys.BACKENDS_FILE

    @property
    def prompts(self) -> Path:
        """Further validation prompts (SimpleTuner's user prompt library: {"name": "prompt"})."""
        return self.config_dir / keys.PROMPT_LIBRARY_FILE

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def config_file(self, fmt: Format) -> Path:
        return self.env if fmt == "env" else self.json

    def resolve(self, value: str) -> Path:
        """A path from the run's files as SimpleTuner reads it: relative ones from the run folder, its working dir."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.root / p


def find_run_root(path: Path) -> Path | None:
    """The run folder (the one holding config/config.env or config/config.json) at ``path`` or up to 4 above."""
    for candidate in [path, *path.parents][:5]:
        if (candidate / keys.CONFIG_DIR / keys.ENV_FILE).is_file() or (candidate / keys.CONFIG_DIR / keys.JSON_FILE).is_file():
            return candidate
    return None


def checkpoint_step(folder: Path) -> int | None:
    """N for a ``checkpoint-N`` folder, else None."""
    tail = folder.name[len(keys.CHECKPOINT_PREFIX):]
    return int(tail) if folder.name.startswith(keys.CHECKPOINT_PREFIX) and tail.isdigit() else None


def checkpoints(output_dir: Path) -> list[Path]:
    """The ``checkpoint-N`` folders SimpleTuner wrote in ``output_dir``, oldest first."""
    found = [p for p in output_dir.glob(f"{keys.CHECKPOINT_PREFIX}*") if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def incomplete_checkpoint(folder: Path) -> bool:
    """Whether SimpleTuner never finished saving this checkpoint (e.g. a Ctrl-C during the save): resuming from it
    fails, after loading every model."""
    return not (folder / keys.CHECKPOINT_GUARD).is_file()


def incomplete_hint(output: Path, run: Path) -> str:
    """How the run ``run`` goes on when the latest checkpoint in ``output`` is incomplete: delete every incomplete
    one after the last complete one (SimpleTuner resumes from the latest), then resume from that one."""
    found = checkpoints(output)
    complete = [c for c in found if not incomplete_checkpoint(c)]
    cut = found[found.index(complete[-1]) + 1:] if complete else found
    then = (f"continue from {complete[-1].name} with `sd3tune train {quote(str(run))} --resume`" if complete else
            f"start again with `sd3tune train {quote(str(run))}`")
    return f"delete {'it' if len(cut) == 1 else 'them'} (rm -r {' '.join(quote(str(c)) for c in cut)}), then {then}"


def output_conflict(output: Path, resume: bool, steps: int | None) -> tuple[str, str] | None:
    """(problem, fix) when `sd3tune train` (``resume``: with --resume) must refuse this output folder: SimpleTuner
    would silently resume from a checkpoint in it, or replace its finished LoRA; None when it may train."""
    existing = checkpoints(output)
    if existing and not resume:
        return (f"{output} already holds {existing[-1].name}; SimpleTuner would silently resume from it",
                "pass --resume to continue, or move the output folder away to start over")
    if not existing and (output / keys.LORA_WEIGHT_NAME).is_file():
        return (f"{output} already holds a trained {keys.LORA_WEIGHT_NAME} (and no checkpoint to resume from); "
                "training again would replace it",
                "move the output folder away to start over, or set OUTPUT_DIR to a new folder")
    if resume and not existing:
        return f"nothing to resume: no checkpoint in {output}", "run without --resume"
    if resume and steps and (checkpoint_step(existing[-1]) or 0) >= steps:
        return (f"nothing to resume: {existing[-1].name} has all {steps} steps of the run",
                "raise the step count (MAX_NUM_STEPS) to train further")
    return None


VALIDATION_IMAGES_DIR = "validation_images"  # in the output folder (helpers/training/validation.py: save_dir)
# helpers/training/validation_images.py save_images: step_{global step}_{prompt shortname}_{index}_{WxH or unknown},
# .png, .webp or .jpg (validation_image_format png, webp or jpeg)
_VALIDATION_IMAGE = re.compile(r"step_(\d+)_(.+)_(\d+)_(?:\d+x\d+|unknown)\.(?:png|webp|jpg)")
# the prompt's shortname (helpers/training/validation.py prepare_validation_prompt_list): the main prompt
# (--validation_prompt) is "validation", the empty one "unconditional", a prompt library's each its key
MAIN_VALIDATION_PROMPT = "validation"


def validation_image_name(name: str) -> tuple[int, str, int] | None:
    """(training step, prompt shortname, index) of a validation image's file name as SimpleTuner writes it; None
    for any other name."""
    m = _VALIDATION_IMAGE.fullmatch(name)
    return (int(m.group(1)), m.group(2), int(m.group(3))) if m else None


def validation_images(output_dir: Path) -> dict[Path, int]:
    """The validation images SimpleTuner wrote in ``output_dir``, each with the training step it sampled at, by step
    then name."""
    folder = output_dir / VALIDATION_IMAGES_DIR
    found = {p: parsed[0] for p in folder.glob("step_*") if (parsed := validation_image_name(p.name))}
    return dict(sorted(found.items(), key=lambda item: (item[1], item[0].name)))


def validation_prompt_name(image: Path) -> str | None:
    """The shortname of the prompt a validation image (named as SimpleTuner names them) was sampled from."""
    parsed = validation_image_name(image.name)
    return parsed[1] if parsed else None
