"""Fix 2 (continued): SimpleTuner calls ``torch.set_num_threads(--torch_num_threads)``, default 8, whatever the
machine: on 2 cores the oversubscribed threads made every CPU step 1.4x (tiny SD3) to 2.4x (24 blocks) slower. Clamp
the request to the cores this process may use; more intra-op threads than cores never helps. The processes of a
data-parallel job on one machine (torchrun's ``LOCAL_WORLD_SIZE``) share those cores."""

from __future__ import annotations

import os

from sd3tune.simpletuner.compat._patching import expect, replace


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def applies_to(torch) -> str | None:
    return expect(torch, "set_num_threads")  # a builtin: no signature to read


def apply(torch) -> None:
    def clamped(set_num_threads):
        def share() -> int:
            try:
                return max(1, usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
            except ValueError:
                return usable_cores()
        return lambda n: set_num_threads(max(1, min(int(n), share())))

    replace(torch, "set_num_threads", clamped)
