"""Fix 6: for norm clipping SimpleTuner walks every parameter of the transformer each step to find the trainable ones
(``Trainer._get_trainable_parameters``; SD3M: ~1,000 tensors, 6% of a CPU step with 24 blocks; the GPU profile is in
benchmarks/README.md). For a standard LoRA the set is fixed once the optimizer exists: keep it, and walk again only if the
trained module is replaced or a kept parameter stops requiring gradients."""

from __future__ import annotations

from sd3tune.simpletuner.compat._patching import expect, replace


def applies_to(module) -> str | None:
    # the kept set is keyed by the module the pinned method walks
    return expect(module, "Trainer._get_trainable_parameters", ("self",),
                  source=("get_trained_component(unwrap_model=False)",))


def apply(module) -> None:
    def kept(original):
        def _get_trainable_parameters(self):
            config = self.config
            if (config.model_type != "lora" or str(getattr(config, "lora_type", "standard")).lower() != "standard"
                    or getattr(self, "optimizer", None) is None):  # before the optimizer exists, setup may unfreeze
                return original(self)
            component = self.model.get_trained_component(unwrap_model=False)
            known = self.__dict__.get("_sd3tune_trainable")
            if known is not None and known[0] is component and all(p.requires_grad for p in known[1]):
                return list(known[1])
            params = original(self)
            if isinstance(params, list):
                self.__dict__["_sd3tune_trainable"] = (component, tuple(params))
            return params
        return _get_trainable_parameters

    replace(module.Trainer, "_get_trainable_parameters", kept)
