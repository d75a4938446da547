"""Evidence 13 (not a fix, multi-process runs only): nothing in SimpleTuner's log shows that the ranks of one job
end with the same weights (gradients averaged) rather than each its own. When ``Trainer.train`` returns, each process
logs ``sd3tune rank R/W lora digest: SHA256`` over its trained (LoRA) parameters, names sorted."""

from __future__ import annotations

import hashlib
import os

from sd3tune.simpletuner.compat._patching import expect, replace
from sd3tune.simpletuner.compat.rank_samples import requested, say  # noqa: F401 (requested: the same runs)

DIGEST_LINE = "sd3tune rank {rank}/{world} lora digest: {digest}"


def applies_to(module) -> str | None:
    return expect(module, "Trainer.train", ("self",), source=("self.accelerator.end_training()",))


def lora_digest(component) -> str:
    h = hashlib.sha256()
    named = sorted((n.removeprefix("module."), p) for n, p in component.named_parameters() if "lora" in n)
    for name, param in named:
        h.update(name.encode())
        h.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def apply(module) -> None:
    def digested(original):
        def train(self):
            result = original(self)
            component = self.model.get_trained_component(unwrap_model=False)
            say(DIGEST_LINE.format(rank=os.environ.get("RANK", "0"), world=os.environ.get("WORLD_SIZE", "1"),
                                   digest=lora_digest(component)))
            return result
        return train

    replace(module.Trainer, "train", digested)
