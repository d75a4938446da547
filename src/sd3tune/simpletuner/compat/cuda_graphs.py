"""Replay a module's training forward and backward as two CUDA graphs (``sd3tune train --cuda-graphs``).

At batch 1 a 1024 px SD3 Medium LoRA step is bound by launching kernels from Python, not by the GPU
(the project's reference profile: the plain diffusers loop runs at 13% of the matmul peak; SimpleTuner's eager step
is 1.3-1.5x slower still). Capturing the transformer's forward and its backward once, as two CUDA graphs, turns the
thousands of launches of each pass into one replay; the loss, the optimizer and SimpleTuner's bookkeeping stay eager.

A replay re-runs the captured kernels on the captured memory, so :class:`GraphedModule` replays only a call it
can prove is the captured one, and lets the caller run eagerly otherwise:
- the same input shapes, dtypes and devices as a captured call (each new signature is captured once, up to
  ``MAX_CAPTURES`` and while the device has ``MEMORY_HEADROOM`` times the first capture's memory free: each keeps
  its own activations; captures share one memory pool), no input that needs a gradient;
- the same parameter and buffer storage, and the same trainable parameters, as at capture (storage moved: the
  graphs are dropped and captured again; storage that moves again within ``MIN_REPLAYS_PER_MOVE`` replays, as
  offloading would every step, ends replay for the run);
- no replayed forward still waiting for its backward: a second forward would overwrite the activations that
  backward reads, so it runs eagerly (a forward whose graph is dropped unused stops waiting);
- no module hooks (a replay runs kernels, not Python: a hook would run at capture and never again).
A capture that fails (an op CUDA cannot capture, no memory) is tried once more with FlashAttention / memory-efficient
attention only; then replay is given up for the run if it was the first signature, or that signature runs eagerly
while the ones captured before keep replaying.
Outputs and gradients are handed out as copies: nothing the caller keeps aliases the graphs' static memory, and
gradient accumulation over several forwards adds up as it does eagerly.

The graph itself is a parameter (``new_graph``): :class:`CudaGraphs` makes real ``torch.cuda.CUDAGraph``\\ s; the
tests pass a stand-in that re-runs the captured Python on each replay, which checks everything here but the capture.
"""

from __future__ import annotations

import sys
import time
import weakref
from contextlib import nullcontext
from typing import Any, Callable, Protocol, Sequence

import torch

MAX_CAPTURES = 8  # input signatures (aspect buckets) captured per module; the rest run eagerly
MEMORY_HEADROOM = 1.25  # another signature is captured only with this many times the first capture's memory free
GIB = 2**30
MIN_REPLAYS_PER_MOVE = 10  # parameter storage moving more often than this (offloading) ends replay for the run
WARMUP_PASSES = 3  # eager forward + backward passes before a capture (cuBLAS/cuDNN settle their workspaces)


def log(message: str) -> None:
    # a line of its own: SimpleTuner's progress bar leaves the current line open
    print(f"\nsd3tune cuda-graphs: {message}", file=sys.stderr, flush=True)


_SAID: set[str] = set()


def eager_because(reason: str) -> None:
    """Log why a call runs eagerly, once per reason and process."""
    if reason not in _SAID:
        _SAID.add(reason)
        log(f"running eagerly: {reason}")


class Graph(Protocol):
    def capture(self, fn: Callable[[], Any]) -> Any: ...

    def replay(self) -> None: ...


class GraphMaker(Protocol):
    def __call__(self) -> Graph: ...

    def warmup(self) -> Any: ...  # a context manager for the eager passes before a capture

    def synchronize(self) -> None: ...  # wait for the device (between warm-up, capture and the first replay)

    def used_bytes(self) -> int | None: ...  # device memory held, unused cache given back first (None: not known)

    def free_bytes(self) -> int | None: ...  # device memory a new capture could still get (None: not known)


class _CudaGraph:
    def __init__(self, pool: Any, stream: torch.cuda.Stream) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool, self.stream = pool, stream

    def capture(self, fn: Callable[[], Any]) -> Any:
        # thread_local: SimpleTuner's prefetch thread may copy the next batch to the GPU meanwhile (legal: its
        # stream is not the one being captured); "global" would make that thread's CUDA calls fail
        with torch.cuda.graph(self.graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


class CudaGraphs:
    """Real CUDA graphs sharing one memory pool and one capture stream (warm-up runs on that stream too)."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()

    def __call__(self) -> Graph:
        return _CudaGraph(self.pool, self.stream)

    def warmup(self):
        self.stream.wait_stream(torch.cuda.current_stream())
        return torch.cuda.stream(self.stream)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def used_bytes(self) -> int:
        # a capture's activations are freed inside its graphs' private pool, not given back: they do not count as
        # allocated tensors, but the pool keeps them; what the device has lost is what a capture costs
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        return total - free

    def free_bytes(self) -> int:
        # free on the device, plus what PyTorch holds cached but unused (it gives that back before failing)
        return torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


def _uncached_autocast(device_type: str):
    """Autocast as the caller set it, minus its cast cache: casts cached by a warm-up pass would be read, not
    recorded, by the capture, and every replay would reuse the stale copies (what ``make_graphed_callables`` forbids)."""
    if not torch.is_autocast_enabled(device_type):
        return nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)


def _capturable_attention(device_type: str):
    """The second try at a capture: attention through FlashAttention or memory-efficient kernels only (a replay
    keeps whichever kernel the capture picked; cuDNN's is PyTorch's first choice on Hopper)."""
    if device_type != "cuda":
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def _hooked_modules(module: torch.nn.Module) -> list[str]:
    """Modules with hooks: a replay runs kernels, not Python, so a hook would run at capture and never again."""
    return [name or type(module).__name__ for name, m in module.named_modules()
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks]


class GraphedPasses:
    """One captured forward and its backward, for one input signature."""

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                 params: Sequence[torch.Tensor], new_graph: GraphMaker, warmup: int = WARMUP_PASSES) -> None:
        self.static_inputs = tuple(x.detach().clone() for x in inputs)
        self.params = tuple(params)
        live: dict[str, torch.Tensor] = {}

        def forward() -> torch.Tensor:
            live["out"] = fn(*self.static_inputs)
            return live["out"]

        def backward() -> tuple[torch.Tensor | None, ...]:
            return torch.autograd.grad(live["out"], self.params, self.static_grad_out, allow_unused=True)

        with new_graph.warmup(), _uncached_autocast(self.static_inputs[0].device.type):
            for _ in range(warmup):
                out = fn(*self.static_inputs)
                torch.autograd.grad(out, self.params, torch.ones_like(out), allow_unused=True)
            del out
        new_graph.synchronize()
        self.forward_graph = new_graph()
        with _uncached_autocast(self.static_inputs[0].device.type):
            self.static_out: torch.Tensor = self.forward_graph.capture(forward)
        self.static_grad_out = torch.zeros_like(self.static_out)
        self.backward_graph = new_graph()
        self.static_grads: tuple[torch.Tensor | None, ...] = tuple(self.backward_graph.capture(backward))
        new_graph.synchronize()

    def run_forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        for static, x in zip(self.static_inputs, inputs):
            if static.data_ptr() != x.data_ptr():
                static.copy_(x)
        self.forward_graph.replay()
        return self.static_out.detach().clone()

    def run_backward(self, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        self.static_grad_out.copy_(grad_out)
        self.backward_graph.replay()
        present = [g.detach() for g in self.static_grads if g is not None]
        copies = iter(torch._foreach_mul(present, 1.0) if present else ())  # one launch for all copies
        return tuple(next(copies) if g is not None else None for g in self.static_grads)


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, owner: GraphedModule, passes: GraphedPasses, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.owner, ctx.passes, ctx.n_inputs = owner, passes, len(passes.static_inputs)
        out = passes.run_forward(tensors[:ctx.n_inputs])
        owner.waiting = weakref.ref(ctx)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        owner = ctx.owner
        if owner.waiting is None or owner.waiting() is not ctx:
            raise RuntimeError("sd3tune cuda-graphs: a replayed forward was overwritten before its backward")
        grads = ctx.passes.run_backward(grad_out)
        owner.waiting = None
        return (None, None, *([None] * ctx.n_inputs), *grads)


NEW_GRAPH: Callable[[], GraphMaker] = CudaGraphs  # what GraphedModule captures with unless told otherwise


def signature(tensors: Sequence[torch.Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device, t.stride()) for t in tensors)


class GraphedModule:
    """Replays ``fn(*inputs)`` (a forward of ``module`` returning one tensor) from CUDA graphs when it safely can.

    ``__call__`` returns the output, with autograd wired to the captured backward, or ``None``: then the caller
    runs its eager forward. Each reason for ``None`` is logged once.
    """

    def __init__(self, module: torch.nn.Module, fn: Callable[..., torch.Tensor],
                 new_graph: Callable[[], GraphMaker] | None = None, max_captures: int = MAX_CAPTURES,
                 warmup: int = WARMUP_PASSES) -> None:
        self.module, self.fn = module, fn
        self.make_graphs = new_graph or NEW_GRAPH
        self.max_captures, self.warmup = max_captures, warmup
        self.graphs: GraphMaker | None = None
        self.captures: dict[tuple, GraphedPasses] = {}
        self.eager_shapes: set[tuple] = set()  # signatures that run eagerly while others replay (no memory, failed)
        self.capture_bytes = 0  # device memory the first capture kept (its activations and static tensors)
        self.tensors: tuple[torch.Tensor, ...] = ()
        self.storage: tuple = ()
        self.replays_since_capture = 0
        self.off: str | None = None  # why replay is given up for good
        self.waiting: Callable[[], Any] | None = None  # weakref to the autograd node of the last replayed forward
        self.replays = 0

    def _forget_captures(self) -> None:
        self.captures.clear()
        self.eager_shapes.clear()

    def _give_up(self, reason: str) -> None:
        self.off = reason
        log(f"off for this run: {reason}")
        self._forget_captures()
        self.graphs = None
        return None

    def _fingerprint(self) -> tuple:
        return tuple((t.data_ptr(), t.requires_grad) for t in self.tensors)

    def __call__(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor | None:
        if self.off is not None:
            return None
        if any(x.requires_grad for x in inputs):
            eager_because("an input needs a gradient")
            return None
        if self.waiting is not None and self.waiting() is not None:
            eager_because("a second forward before the previous one's backward")
            return None
        if self.captures and self._fingerprint() != self.storage:
            self._forget_captures()
            if self.replays_since_capture < MIN_REPLAYS_PER_MOVE:
                return self._give_up(f"parameter storage moved after {self.replays_since_capture} replays (offloading?)")
            log(f"parameter storage moved after {self.replays_since_capture} replays: capturing again")
        key = signature(inputs)
        passes = self.captures.get(key)
        if passes is None:
            if key in self.eager_shapes:
                return None
            if len(self.captures) >= self.max_captures:
                eager_because(f"more than {self.max_captures} input shapes")
                return None
            passes = self._capture(key, inputs)
            if passes is None:
                return None
        self.replays += 1
        self.replays_since_capture += 1
        return _Replay.apply(self, passes, *inputs, *passes.params)

    def _capture(self, key: tuple, inputs: Sequence[torch.Tensor]) -> GraphedPasses | None:
        first = not self.captures  # the first signature: it sets the storage fingerprint and the memory estimate
        if first:
            self.tensors = (*self.module.parameters(), *self.module.buffers())
            self.storage = self._fingerprint()
            self.replays_since_capture = 0
        params = [t for t in self.module.parameters() if t.requires_grad]
        if not params:
            eager_because("nothing to train")
            return None
        hooked = _hooked_modules(self.module)
        if hooked:
            return self._give_up(f"module hooks on {', '.join(hooked[:3])} (a replay would skip them)")
        shapes = ", ".join("x".join(map(str, s)) for s, *_ in key)
        if self.graphs is None:
            self.graphs = self.make_graphs()
        if not first and not self._room_for_another(shapes):
            self.eager_shapes.add(key)
            return None
        start = time.perf_counter()
        before = self.graphs.used_bytes() if first else None
        tries = [nullcontext(), _capturable_attention(inputs[0].device.type)]
        passes = None
        for attempt, context in enumerate(t for t in tries if t is not None):
            try:
                if self.graphs is None:
                    self.graphs = self.make_graphs()
                with context:
                    passes = GraphedPasses(self.fn, inputs, params, self.graphs, warmup=self.warmup)
                break
            except Exception as exc:  # an op that cannot be captured, or no memory left for one
                failure = f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if first:
                    # nothing replays from the pool yet: start pool and stream afresh, in case the failure left them
                    # unusable (with captures, keep sharing theirs: a new pool could not reuse what they hold)
                    self.graphs = None
                if attempt == 0 and tries[1] is not None:
                    log(f"{failure}; trying again with FlashAttention / memory-efficient attention")
        if passes is None:
            if first:
                return self._give_up(failure)
            self.eager_shapes.add(key)  # the shapes captured so far keep replaying
            eager_because(f"inputs {shapes}: {failure}")
            return None
        if first:
            after = self.graphs.used_bytes()
            self.capture_bytes = max(0, after - before) if after is not None and before is not None else 0
        self.captures[key] = passes
        if attempt:
            log("captured with FlashAttention / memory-efficient attention (replays keep them)")
        kept = f"; keeps {self.capture_bytes / GIB:.1f} GiB" if first and self.capture_bytes else ""
        log(f"captured forward + backward for inputs {shapes} in {time.perf_counter() - start:.1f} s "
            f"({len(params)} trainable tensors; {len(self.captures)} shape(s) so far{kept})")
        return passes

    def _room_for_another(self, shapes: str) -> bool:
        """Whether the device has memory for one more capture (each keeps its own activations: several aspect
        buckets at 1024 px would otherwise fill a 24 GB card); the first capture's size is the estimate."""
        assert self.graphs is not None
        free = self.graphs.free_bytes()
        if not self.capture_bytes or free is None or free >= MEMORY_HEADROOM * self.capture_bytes:
            return True
        eager_because(f"inputs {shapes}: no memory for another capture (~{self.capture_bytes / GIB:.1f} GiB each, "
                      f"{free / GIB:.1f} GiB free)")
        return False

