"""Fix 7: SimpleTuner starts a new iterator over its DataLoader for every batch, and each ``iter(DataLoader)`` draws a
worker base seed from torch's global generator (unused: SimpleTuner loads with ``num_workers=0``). With
``dataloader_prefetch`` those draws happen on the loader thread while the training thread draws its noise and
timesteps from the same generator, in no fixed order: two runs with one seed trained different LoRAs. Give each of
SimpleTuner's DataLoaders a private generator, so loading never touches the global one."""

from __future__ import annotations

from sd3tune.simpletuner.compat._patching import ANY, expect, replace


def applies_to(module) -> str | None:
    return expect(module, "FactoryRegistry._create_dataset_and_sampler", ("self", "backend", "init_backend", ANY),
                  source=('init_backend["train_dataloader"] = torch.utils.data.DataLoader(',))


def apply(module) -> None:
    def with_private_generator(original):
        def _create_dataset_and_sampler(self, backend, init_backend, *args, **kwargs):
            result = original(self, backend, init_backend, *args, **kwargs)
            loader = init_backend.get("train_dataloader") if isinstance(init_backend, dict) else None
            if loader is not None and getattr(loader, "generator", False) is None:
                import torch

                loader.generator = torch.Generator()  # fixed default seed; only iter()'s unused worker seed uses it
            return result
        return _create_dataset_and_sampler

    replace(module.FactoryRegistry, "_create_dataset_and_sampler", with_private_generator)
