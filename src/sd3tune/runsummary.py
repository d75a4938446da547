"""How the evaluated run trained, for `sd3tune evaluate`'s report: the loss and learning rate of every step (from
SimpleTuner's logs, ``simpletuner.history``), the run's key settings, its trainings, and its latest validation images
(copied into the evaluation folder, so the report opens from anywhere)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

VALIDATION_COPY = "validation"  # in the evaluation folder
SMOOTHING = 0.9  # exponential moving average of the loss curve (debiased, as TensorBoard's)


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """The debiased exponential moving average of ``values`` (the first value is not pulled towards 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** (i + 1)))
    return out


def key_settings(config: Any, trigger: str | None) -> dict[str, Any]:
    """What a reader of the report wants to know about how the run trained."""
    o, lora = config.optim, config.lora
    return {"base model": config.model.name_or_path, "trigger word": trigger,
            "LoRA rank / alpha": f"{lora.rank} / {lora.alpha if lora.alpha is not None else lora.rank}",
            "optimizer": o.optimizer, "learning rate": o.learning_rate,
            "lr schedule": o.lr_scheduler + (f", {o.lr_warmup_steps} warm-up steps" if o.lr_warmup_steps else ""),
            "batch size x accumulation": f"{o.train_batch_size} x {o.gradient_accumulation_steps}",
            "steps": o.max_train_steps, "resolution": f"{config.data.resolution} px ({config.data.resolution_type})",
            "schedule shift": config.timesteps.schedule_shift, "mixed precision": config.precision.mixed_precision,
            "caption dropout": config.data.caption_dropout_probability, "seed": o.seed}


def training_summary(run_dir: Path, output_dir: Path, config: Any, manifest: dict[str, Any], trigger: str | None,
                     out: Path) -> dict[str, Any]:
    """The training side of the report (JSON-ready); the latest validation images are copied into ``out``."""
    from sd3tune.simpletuner.history import latest_validation_images, loss_history, training_logs
    from sd3tune.simpletuner.layout import VALIDATION_IMAGES_DIR, RunPaths

    trainings = [t for t in manifest.get("trainings") or [] if isinstance(t, dict)]
    history = loss_history(training_logs(RunPaths(run_dir).logs, [t.get("log") for t in trainings]))
    step, images = latest_validation_images(output_dir)
    copies = []
    for image in images:
        target = out / VALIDATION_COPY / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, target)
        copies.append(f"{VALIDATION_COPY}/{image.name}")
    lrs = [lr for lr in history.lr if lr is not None]
    return {
        "loss": {"steps": history.steps, "values": history.loss, "smoothed": smooth(history.loss),
                 "smoothing": SMOOTHING, "source": history.logs,
                 "note": "SimpleTuner's progress bar (step_loss, 3 significant digits), one value per optimizer step"},
        "lr": {"steps": [s for s, lr in zip(history.steps, history.lr) if lr is not None], "values": lrs},
        "settings": key_settings(config, trigger),
        "trainings": [{"started": t.get("started"), "seconds": t.get("seconds"), "status": t.get("status"),
                       "resume": t.get("resume"), "steps": t.get("steps"), "final_loss": t.get("final_loss")}
                      for t in trainings],
        "validation_images": {"step": step, "files": copies, "from": str(output_dir / VALIDATION_IMAGES_DIR)},
    }
