"""Fix 8: accelerate's regional compilation also compiles every module outside the repeated blocks, one graph each
(SD3: patch and timestep embedders, context embedder, final norm and projection), which took much of step 1 (GPU
timing in benchmarks/README.md) while they hold a sliver of the step's work. Compile only the repeated blocks, in place
(``Module.compile``, so parameter names and the saved LoRA keep their names)."""

from __future__ import annotations

from sd3tune.simpletuner.compat._patching import expect, is_compiled, replace


def applies_to(module) -> str | None:
    return expect(module, "is_repeated_blocks", ("module",)) or expect(module, "compile_regions", ("module", "**"))


def apply(module) -> None:
    is_repeated = module.is_repeated_blocks

    def blocks_only(original):
        def compile_regions(model, **compile_kwargs):
            outermost: dict[str, object] = {}
            for name, sub in model.named_modules():
                if is_repeated(sub) and not any(outer == "" or name.startswith(f"{outer}.") for outer in outermost):
                    outermost[name] = sub
            if not outermost:  # nothing repeats: accelerate's own behaviour (the whole model)
                return original(model, **compile_kwargs)
            for repeated in outermost.values():
                for block in repeated:
                    if not is_compiled(block):
                        block.compile(**compile_kwargs)
            return model
        return compile_regions

    replace(module, "compile_regions", blocks_only)
