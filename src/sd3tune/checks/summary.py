"""check's summary of the datasets: images, aspect buckets and the step arithmetic of SimpleTuner's trainer, for
the run and for each image dataset (its share of an epoch's steps)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sd3tune.checks.datasets import UsableDataset
    from sd3tune.checks.engine import Context


@dataclass
class DatasetShare:
    """One image dataset in check's summary: its images, buckets, and its share of an epoch's batches."""

    id: str
    images: int
    buckets: dict[str, int]  # "WxH" -> usable images
    samples: int  # usable images x (repeats + 1)
    batches: int  # per epoch
    of_batches: int  # every dataset's, per epoch

    def render(self) -> str:
        share = f"{100 * self.batches / self.of_batches:.1f}% of steps" if self.of_batches else "no steps"
        buckets = ", ".join(f"{k}: {v}" for k, v in self.buckets.items()) or "none usable"
        return (f"dataset {self.id}: {self.images} images, buckets [{buckets}], {self.samples} samples/epoch, "
                f"{self.batches} batches/epoch ({share})")


def bucket_name(bucket: tuple[int, int]) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def summarise(ctx: Context, datasets: list[UsableDataset]) -> None:
    """Images, buckets and the step arithmetic of SimpleTuner's trainer (len(sampler) per dataset, / accumulation)."""
    s, cfg = ctx.summary, ctx.cfg
    s.images = sum(d.scanned for d in datasets)
    # images counted once per dataset even when two datasets share a folder: that is what SimpleTuner trains on
    s.usable = sum(sum(d.usable.values()) for d in datasets)
    s.samples_per_epoch = sum(sum(d.usable.values()) * (d.backend.repeats + 1) for d in datasets)
    buckets: Counter = Counter()
    for d in datasets:
        buckets.update({bucket_name(k): n for k, n in d.usable.items()})
    s.buckets = dict(sorted(buckets.items()))
    if cfg is None or not s.samples_per_epoch or not ctx.valid("train_batch_size", "gradient_accumulation_steps"):
        return
    bs, accum = cfg.optim.train_batch_size, cfg.optim.gradient_accumulation_steps
    # an epoch runs every dataset to its end, repeats included (random_dataloader_iterator): its batches, its share
    per = {d.backend.id: math.ceil(sum(d.usable.values()) * (d.backend.repeats + 1) / ctx.gpus / bs)
           for d in datasets if d.usable}
    batches = sum(per.values())
    s.datasets = [DatasetShare(d.backend.id, d.scanned, {bucket_name(k): n for k, n in sorted(d.usable.items())},
                               sum(d.usable.values()) * (d.backend.repeats + 1), per.get(d.backend.id, 0), batches)
                  for d in datasets]
    per_epoch = max(1, math.ceil(batches / accum))
    s.steps_per_epoch = per_epoch
    if ctx.valid("max_train_steps", "num_train_epochs"):
        steps = cfg.optim.max_train_steps or cfg.optim.num_train_epochs * per_epoch
        if steps:
            s.steps = steps
            s.epochs = round(steps / per_epoch, 2)

