"""Fix 9, only with ``sd3tune train --cuda-graphs`` (``SD3TUNE_CUDA_GRAPHS=1`` in the training process): SimpleTuner's
SD3 transformer replays its training forward and backward from CUDA graphs (``compat/cuda_graphs.py``) when the call
is one a graph can repeat: keyword inputs ``hidden_states``, ``encoder_hidden_states``, ``pooled_projections``,
``timestep`` on the GPU and no other option set, training mode with gradients, one process, no gradient
checkpointing, TREAD routing, block swapping or compiled blocks. Every other call (validation, sampling) runs
SimpleTuner's forward unchanged."""

from __future__ import annotations

import os

from sd3tune.simpletuner.compat._patching import ANY, expect, is_compiled, replace

CUDA_GRAPHS_ENV = "SD3TUNE_CUDA_GRAPHS"  # "1": `sd3tune train --cuda-graphs`; set by the launcher only
GRAPHED_INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
REPLAY_DEVICES = ("cuda",)  # where inputs must live for a replay (the tests add "cpu" with a stand-in graph)
NO_GRAD = "no gradients"  # validation and sampling: never replayed, not worth a log line


def requested() -> bool:
    return os.environ.get(CUDA_GRAPHS_ENV) == "1"


def applies_to(module) -> str | None:
    # the graphed inputs lead the forward's parameters, and the attributes _replay_blocker reads are the forward's own
    return (expect(module, "Transformer2DModelOutput")
            or expect(module, "SD3Transformer2DModel.forward", ("self", *GRAPHED_INPUTS, ANY),
                      source=("return_dict", "self._tread_routes", "self._musubi_block_swap",
                              "self.gradient_checkpointing", "self.transformer_blocks")))


def _replay_blocker(transformer, args: tuple, kwargs: dict) -> str | None:
    """Why this SD3 transformer call cannot be replayed from CUDA graphs, or None when it can."""
    import torch

    if not torch.is_grad_enabled():
        return NO_GRAD
    if not transformer.training:
        return "module in eval mode"
    if args:
        return "positional arguments"
    extra = [k for k, v in kwargs.items() if k not in GRAPHED_INPUTS and k != "return_dict" and v is not None]
    if extra:
        return f"option(s) {', '.join(sorted(extra))} set"
    inputs = [kwargs.get(k) for k in GRAPHED_INPUTS]
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        return "an input missing"
    if not all(x.device.type in REPLAY_DEVICES for x in inputs):
        return f"inputs on {inputs[0].device.type}"
    if getattr(transformer, "gradient_checkpointing", False):
        return "gradient checkpointing"
    if getattr(transformer, "_tread_routes", None) or getattr(transformer, "_musubi_block_swap", None) is not None:
        return "TREAD routing or block swapping"
    if any(is_compiled(b) for b in getattr(transformer, "transformer_blocks", ())):
        return "compiled blocks (torch.compile)"
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        return "several processes"
    return None


def apply(module) -> None:
    if not requested():
        return
    from sd3tune.simpletuner.compat import cuda_graphs

    def replayed(original):
        def forward(self, *args, **kwargs):
            blocker = _replay_blocker(self, args, kwargs)
            out = None
            if blocker is None:
                runner = self.__dict__.get("_sd3tune_graphs")
                if runner is None:
                    def sample(hidden_states, encoder_hidden_states, pooled_projections, timestep):
                        return original(self, hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                        pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]
                    runner = self.__dict__["_sd3tune_graphs"] = cuda_graphs.GraphedModule(self, sample)
                out = runner([kwargs[k] for k in GRAPHED_INPUTS])
            elif blocker != NO_GRAD:
                cuda_graphs.eager_because(blocker)
            if out is None:
                return original(self, *args, **kwargs)
            if kwargs.get("return_dict", True):
                return module.Transformer2DModelOutput(sample=out)
            return (out,)
        return forward

    replace(module.SD3Transformer2DModel, "forward", replayed)
