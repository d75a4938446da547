"""What `sd3tune init`'s training flags and dataset specs say, typed: RunConfig section overrides from the knobs
(`--lr`, `--optimizer`, `--tracker`, ...), one dataset per `--data DIR[:key=value,...]` / `--reg-data`, and how
each dataset is captioned (regularisation data never with the trigger).

The values themselves are validated by the config models (``RunConfig``, ``ImageBackend``) when init builds the
run; here only what the models cannot know: SimpleTuner's optimizer names, the tracker's package, the spec syntax.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd3tune.errors import Sd3tuneError
from sd3tune.findings import Finding, plural, warning
from sd3tune.simpletuner.catalog import load_catalog

# Knobs' field -> the RunConfig setting it sets; the flag is the field's name (``grad_accum`` -> ``--grad-accum``)
KNOB_PATHS = {
    "lr": "optim.learning_rate", "batch_size": "optim.train_batch_size", "grad_accum": "optim.gradient_accumulation_steps",
    "optimizer": "optim.optimizer", "scheduler": "optim.lr_scheduler", "warmup_steps": "optim.lr_warmup_steps",
    "alpha": "lora.alpha", "checkpoint_every": "checkpoints.step_interval", "validate_every": "validation.step_interval",
    "seed": "optim.seed", "tracker": "tracking.report_to", "tracker_project": "tracking.project_name",
    "tracker_run": "tracking.run_name",
}
KNOB_FLAGS = {path: "--" + name.replace("_", "-") for name, path in KNOB_PATHS.items()}  # for errors by setting
TRACKER_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}  # --tracker -> the package it needs


@dataclass
class Knobs:
    """init's training flags; None leaves the preset's (or RunConfig's) value."""

    lr: float | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    optimizer: str | None = None
    scheduler: str | None = None
    warmup_steps: int | None = None
    alpha: float | None = None
    checkpoint_every: int | None = None
    validate_every: int | None = None
    seed: int | None = None
    tracker: str | None = None
    tracker_project: str | None = None
    tracker_run: str | None = None

    def overrides(self) -> dict[str, dict[str, Any]]:
        """The set flags as RunConfig section overrides (unvalidated: the models judge the values)."""
        out: dict[str, dict[str, Any]] = {}
        for name, path in KNOB_PATHS.items():
            value = getattr(self, name)
            if value is not None:
                section, setting = path.split(".")
                out.setdefault(section, {})[setting] = value
        return out

    def check(self) -> None:
        """What the models cannot judge: SimpleTuner's optimizer names and the tracker's package."""
        if self.optimizer is not None:
            catalog = load_catalog()
            if self.optimizer not in catalog.optimizers:
                raise Sd3tuneError(f"--optimizer {self.optimizer!r}: SimpleTuner {catalog.simpletuner_version} has no "
                                   "such optimizer", hint=catalog.optimizer_hint(self.optimizer))
        package = TRACKER_PACKAGES.get(self.tracker or "")
        if package and importlib.util.find_spec(package) is None:
            raise Sd3tuneError(f"--tracker {self.tracker} needs the {package} package, which is not installed",
                               hint=f"pip install {package}, or use --tracker none")


# --------------------------------------------------------------------------------------------- dataset specs

# DIR:key=value,key=value — the options a dataset spec takes, and the ImageBackend fields they set
SPEC_OPTIONS = ("repeats", "resolution", "crop", "probability", "id")
CROP_STYLES = ("center", "random", "corner", "face")  # crop=none: resize, no crop (SimpleTuner's default)
_SPEC = re.compile(r"^(?P<dir>.+?):(?P<opts>[A-Za-z_]+=[^,=]*(?:,[A-Za-z_]+=[^,=]*)*)$")


@dataclass
class DataSpec:
    """One `--data` / `--reg-data` argument: a folder and the dataset options given after it."""

    folder: Path
    flag: str = "--data"
    options: dict[str, Any] = field(default_factory=dict)  # ImageBackend fields

    @property
    def regularisation(self) -> bool:
        return self.flag == "--reg-data"


def _number(flag: str, key: str, text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise Sd3tuneError(f"{flag} option {key}={text!r} is not {'a whole number' if kind is int else 'a number'}",
                           hint=f"e.g. {key}={'3' if key == 'repeats' else '0.5' if kind is float else '768'}") from None


def parse_spec(text: str | Path, flag: str = "--data") -> DataSpec:
    """``DIR`` or ``DIR:repeats=3,resolution=768,crop=center`` as a DataSpec (a Path is a plain folder)."""
    if isinstance(text, Path):
        return DataSpec(text, flag)
    match = _SPEC.match(text)
    if match is None:
        return DataSpec(Path(text), flag)
    options: dict[str, Any] = {}
    for pair in match["opts"].split(","):
        key, value = pair.split("=", 1)
        if key not in SPEC_OPTIONS:
            close = difflib.get_close_matches(key, SPEC_OPTIONS, n=1)
            raise Sd3tuneError(f"{flag} {match['dir']}: unknown dataset option {key!r}",
                               hint=(f"did you mean {close[0]}? " if close else "") +
                                    f"options: {', '.join(SPEC_OPTIONS)}")
        if key in options or (key == "crop" and "crop" in options):
            raise Sd3tuneError(f"{flag} {match['dir']}: {key} is given twice", hint="give each option once")
        if key == "repeats":
            options["repeats"] = _number(flag, key, value, int)
        elif key == "resolution":
            options["resolution"] = _number(flag, key, value, int)
        elif key == "probability":
            options["probability"] = _number(flag, key, value, float)
        elif key == "id":
            options["id"] = value
        elif value == "none":
            options["crop"] = False
        elif value in CROP_STYLES:
            options.update(crop=True, crop_style=value, crop_aspect="square")
        else:
            raise Sd3tuneError(f"{flag} {match['dir']}: crop={value!r} is not one of none, {', '.join(CROP_STYLES)}",
                               hint="e.g. crop=center")
    return DataSpec(Path(match["dir"]), flag, options)


TEXT_EMBEDS_ID = "text-embeds"  # the id of the text embeds' dataset that init writes beside the image datasets


def _folder_id(folder: Path) -> str:
    ident = re.sub(r"[^A-Za-z0-9_-]+", "-", folder.name).strip("-")
    return ident or "images"


def dataset_ids(datasets: list[tuple[DataSpec, Path]]) -> list[str]:
    """Each dataset's id: its ``id=NAME`` as written, else its (resolved) folder's name, with -2, -3, ... when that
    name is taken. An id=NAME given twice, or the text embeds' id, is refused rather than renamed."""
    taken: dict[str, DataSpec | None] = {TEXT_EMBEDS_ID: None}
    for spec, _ in datasets:
        ident = spec.options.get("id")
        if ident and ident in taken:
            other = taken[ident]
            said = "the text embeds' dataset" if other is None else f"{other.flag} {other.folder}"
            raise Sd3tuneError(f"{spec.flag} {spec.folder}: id={ident} is already the id of {said}",
                               hint="give each dataset its own id=NAME, or leave id= out to name it after its folder")
        if ident:
            taken[ident] = spec
    ids = []
    for spec, folder in datasets:
        ident = spec.options.get("id")
        if not ident:  # two folders of the same name, or a folder named like an id=NAME: -2, -3, ...
            base = ident = _folder_id(folder)
            n = 1
            while ident in taken:
                n += 1
                ident = f"{base}-{n}"
            taken[ident] = spec
        ids.append(ident)
    return ids


# ---------------------------------------------------------------------------------------------- captioning


def caption_settings(spec: DataSpec, folder: Path, images: list, strategy: str | None, trigger: str | None,
                     prefix: str | None, warnings: list[Finding]) -> dict[str, Any]:
    """A dataset's caption settings (ImageBackend fields): --caption-strategy, else .txt captions, the trigger, or
    the file names; --caption-prefix before each. A --reg-data dataset: see ``_reg_captioning``."""
    captioned = [i for i in images if i.caption]
    if spec.regularisation:
        return _reg_captioning(folder, captioned, trigger, warnings)
    chosen = strategy or ("textfile" if captioned else "instanceprompt" if trigger else "filename")
    if chosen == "instanceprompt" and not trigger:
        raise Sd3tuneError("--caption-strategy instanceprompt needs --trigger (the caption of every image)",
                           hint="pass --trigger WORD")
    if chosen == "textfile" and trigger and not prefix and any(trigger not in i.caption for i in captioned):
        missing = sum(trigger not in i.caption for i in captioned)
        warnings.append(warning(str(folder), "", f"{missing} captions do not contain the trigger {trigger!r}",
                                "add it to the captions so the LoRA binds to it, or pass --caption-prefix"))
    elif chosen == "filename" and not strategy:
        warnings.append(warning(str(folder), "", "no .txt captions: file names are used as captions",
                                "add captions, or pass --trigger WORD to caption every image with it"))
    image: dict[str, Any] = {"caption_strategy": chosen}
    if chosen == "instanceprompt":
        image["instance_prompt"] = trigger
    elif prefix:
        image.update(instance_prompt=prefix, prepend_instance_prompt=True)
    return image


def _reg_captioning(folder: Path, captioned: list, trigger: str | None, warnings: list[Finding]) -> dict[str, Any]:
    """Regularisation images are captioned by their own .txt captions, else their file names (SimpleTuner's
    ``filename``: the name, ``_`` as spaces); never by the trigger, --caption-prefix or --caption-strategy, which
    caption the training data. For a LoRA SimpleTuner trains a regularisation caption toward the base model's own
    prediction (trainer ``_prepare_regularisation_parent_targets``): the trigger there would unteach it."""
    if not captioned:
        warnings.append(warning(str(folder), "", "no .txt captions in this --reg-data folder: file names are used "
                                                 "as captions", "write a .txt caption describing each image, "
                                                                "without the trigger (e.g. 'a photo of a dog')"))
        return {"caption_strategy": "filename"}
    word = re.compile(rf"(?<!\w){re.escape(trigger)}(?!\w)", re.IGNORECASE) if trigger else None
    holding = sum(bool(word.search(i.caption)) for i in captioned) if word else 0
    if holding:
        warnings.append(warning(str(folder), "", f"{plural(holding, 'regularisation caption')} "
                                                 f"{'holds' if holding == 1 else 'hold'} the trigger {trigger!r}",
                                "take it out of them: SimpleTuner trains regularisation captions toward the base "
                                "model's output, which unteaches the trigger"))
    return {"caption_strategy": "textfile"}
