"""Evidence 12 (not a fix, multi-process runs only): SimpleTuner does not log which samples each process trains on.
Each process logs the samples of every batch its sampler yields, as ``sd3tune rank R/W batch: name,name``, so a test
(or a user) can see that the ranks of one job split each epoch between them."""

from __future__ import annotations

import logging
import os
import sys

from sd3tune.simpletuner.compat._patching import expect, replace

BATCH_LINE = "sd3tune rank {rank}/{world} batch: {names}"
log = logging.getLogger("sd3tune.compat")


def requested() -> bool:
    from sd3tune.simpletuner.compat.cpu_process_group import requested as multi_process

    return multi_process()


def applies_to(module) -> str | None:
    return expect(module, "MultiAspectSampler.__iter__", ("self",), source=('instance["image_path"]',))


def say(line: str) -> None:
    """A line of its own in the training log, from every rank (SimpleTuner's logger is quiet off rank 0)."""
    sys.stderr.write(f"\n{line}\n")  # one write: another thread's progress bar cannot split it
    sys.stderr.flush()


def apply(module) -> None:
    def logged(original):
        def __iter__(self):
            rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
            for batch in original(self):
                names = [os.path.basename(str(s.get("image_path", "?"))) for s in batch if isinstance(s, dict)]
                say(BATCH_LINE.format(rank=rank, world=world, names=",".join(names)))
                yield batch
        return __iter__

    replace(module.MultiAspectSampler, "__iter__", logged)
