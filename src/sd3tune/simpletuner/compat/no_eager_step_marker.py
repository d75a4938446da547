"""Fix 5: SimpleTuner marks a CUDA-graph step before every forward unless ``dynamo_backend`` is empty, and sd3tune
writes ``no``: an eager run imported ``torch._inductor``'s CUDA-graph trees during step 1 (2.1 s on 2 cores) and
marked steps of graphs that do not exist. Skip the marker when no compiler backend is active."""

from __future__ import annotations

from sd3tune.simpletuner.compat._patching import expect, replace


def applies_to(module) -> str | None:
    return (expect(module, "_effective_dynamo_backend", ("config",))
            or expect(module, "mark_cudagraph_step_begin", ("config",)))


def apply(module) -> None:
    backend_of = module._effective_dynamo_backend

    def only_when_compiling(original):
        def mark_cudagraph_step_begin(config) -> None:
            if backend_of(config) != "no":
                original(config)
        return mark_cudagraph_step_begin

    replace(module, "mark_cudagraph_step_begin", only_when_compiling)
