"""Preflight of a run: every configuration, dataset and SimpleTuner-trap problem at once, before any model loads.

Used by `sd3tune check` and at the start of `sd3tune train`. Imports no torch/diffusers/SimpleTuner; every rule
is a small ``check_*`` function over a :class:`Context` that returns findings (``file:key: problem — fix``).
Rules that mirror SimpleTuner 4.10.1 behaviour name the place in its source they follow.

- :mod:`.engine`: the report, the context every rule sees, and ``check_run`` that runs the rules;
- :mod:`.options`: the run's options (extra options, SimpleTuner's traps, steps, LoRA and prompts, the base model);
- :mod:`.paths`: the folders the run reads and writes (output, resume, write access, other runs, environment);
- :mod:`.datasets`: the datasets (entries, images, captions, sizes, buckets against the batch, the summary);
- :mod:`.budget`: disk for the caches and the GPU memory estimate.
- :mod:`.render`: the report as text (`sd3tune check`'s output).
"""

from sd3tune.checks.budget import gpu_memory_estimate
from sd3tune.checks.engine import CheckReport, Context, Summary, check_run

__all__ = ["CheckReport", "Context", "Summary", "check_run", "gpu_memory_estimate"]
