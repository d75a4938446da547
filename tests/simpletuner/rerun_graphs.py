"""A CPU stand-in for ``CudaGraphs`` in the tests: "replay" re-runs the captured Python and writes its results into
the tensors the capture returned, which is what a CUDA graph's replay does to its static memory. With it the tests
check everything ``compat/cuda_graphs.py`` does around a capture, on a machine without a GPU; a capture itself needs
one (tests/simpletuner/test_cuda_graphs.py::test_real_cuda_graphs_train_like_eager, skipped without CUDA)."""

from __future__ import annotations

from contextlib import nullcontext

import torch


def _flat(value) -> list:
    return [value] if isinstance(value, torch.Tensor) or value is None else list(value)


class _Rerun:
    def __init__(self, owner: "RerunGraphs") -> None:
        self.owner = owner

    def capture(self, fn):
        self.owner.captures += 1
        if self.owner.fail or (self.owner.fail_from is not None and self.owner.captures >= self.owner.fail_from):
            raise RuntimeError("operation not permitted when stream is capturing")
        self.fn = fn
        self.static = fn()
        self.owner.used += self.owner.bytes_per_capture  # what a real capture's memory pool would keep
        return self.static

    def replay(self) -> None:
        self.owner.replays += 1
        with torch.enable_grad():  # a replay inside autograd.Function.forward runs no Python, so grad mode is moot
            fresh = self.fn()
        for static, fresh in zip(_flat(self.static), _flat(fresh)):
            if static is not None:
                static.detach().copy_(fresh.detach())


class RerunGraphs:
    """``fail``: every capture fails; ``fail_from``: captures from that one on (1-based, forward and backward count);
    ``bytes_per_capture`` / ``free``: the device memory a capture keeps and what is free (None: not known)."""

    def __init__(self, fail: bool = False, fail_from: int | None = None, bytes_per_capture: int = 0,
                 free: int | None = None) -> None:
        self.fail, self.fail_from = fail, fail_from
        self.bytes_per_capture, self.free = bytes_per_capture, free
        self.used = 0
        self.captures = self.replays = 0

    def __call__(self) -> _Rerun:
        return _Rerun(self)

    def warmup(self):
        return nullcontext()

    def synchronize(self) -> None:
        pass

    def used_bytes(self) -> int:
        return self.used

    def free_bytes(self) -> int | None:
        return self.free
