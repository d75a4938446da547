"""Fix 14: ``--report_to=tensorboard`` stops SimpleTuner 4.10.1 before the first step ("Could not initialize
trackers: value should be one of int, float, str, bool, or torch.Tensor"): its trainer hands every option to
accelerate's ``TensorBoardTracker.store_init_configuration``, which passes them to torch's ``add_hparams`` as they are,
and that refuses None (every unset option), lists and dicts. Store those as text (None as "None", the others as
JSON), as the hparams.yml accelerate also writes can hold them; scalars are stored unchanged."""

from __future__ import annotations

import json

from sd3tune.simpletuner.compat._patching import expect, replace


def tensorboard_value(value):
    if isinstance(value, (bool, int, float, str)):
        return value
    return "None" if value is None else json.dumps(value, default=str)


def applies_to(tracking) -> str | None:
    return expect(tracking, "TensorBoardTracker.store_init_configuration", ("self", "values"),
                  source=("add_hparams(values",))


def apply(tracking) -> None:
    def scalar_only(store):
        return lambda self, values: store(self, {k: tensorboard_value(v) for k, v in values.items()})

    replace(tracking.TensorBoardTracker, "store_init_configuration", scalar_only)
