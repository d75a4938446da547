"""What the fixes share: replacing an upstream attribute once, and checking that an upstream target still has the
shape a fix was written against (the fixes' applies-to guards)."""

from __future__ import annotations

import inspect
import sys

ANY = "..."  # last of a guard's expected parameters: more may follow


def replace(owner, name: str, make) -> None:
    """Set ``owner.name`` to ``make(original)``, once (installing twice changes nothing)."""
    original = getattr(owner, name, None)
    if original is None or getattr(original, "sd3tune_fix", False):
        return
    replacement = make(original)
    replacement.sd3tune_fix = True
    setattr(owner, name, replacement)


def has_accelerator(torch) -> bool:
    """Whether this host has a CUDA or MPS device for torch (a broken CUDA install counts as none)."""
    try:
        return bool(torch.cuda.is_available() or torch.backends.mps.is_available())
    except Exception:  # pragma: no cover - a broken CUDA install
        return False


def _parameters(fn) -> list[str]:
    kinds = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return [kinds.get(p.kind, p.name) for p in inspect.signature(fn).parameters.values()]


def expect(module, path: str, params: tuple[str, ...] | None = None, source: tuple[str, ...] = ()) -> str | None:
    """Why ``module.<path>`` (dotted: ``"Trainer._get_trainable_parameters"``) is not what a fix expects, or None.

    It must exist; with ``params``, its parameter names must be exactly these (``*``/``**`` for ``*args``/``**kwargs``;
    a last :data:`ANY` allows more after them); each of ``source`` must appear in its source code. A function sd3tune
    already replaced passes (installing twice changes nothing)."""
    target = module
    for part in path.split("."):
        target = getattr(target, part, None)
        if target is None:
            return f"{module.__name__} has no {path}"
    if getattr(target, "sd3tune_fix", False) or (params is None and not source):
        return None
    if params is not None:
        try:
            found = _parameters(target)
        except (TypeError, ValueError):
            return f"{module.__name__}.{path} has no readable signature"
        expected = list(params[:-1] if params[-1:] == (ANY,) else params)
        if (found[:len(expected)] if params[-1:] == (ANY,) else found) != expected:
            return f"{module.__name__}.{path} takes ({', '.join(found)}), not ({', '.join(params)})"
    if source:
        try:
            code = inspect.getsource(target)
        except (OSError, TypeError):
            return f"the source of {module.__name__}.{path} is not available"
        missing = [s for s in source if s not in code]
        if missing:
            return f"{module.__name__}.{path} no longer contains {missing[0]!r}"
    return None


def is_compiled(block) -> bool:
    if getattr(block, "_compiled_call_impl", None) is not None:  # nn.Module.compile() (in place)
        return True
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # torch.compile(module) wraps; nothing compiled without it
    return dynamo is not None and isinstance(block, dynamo.OptimizedModule)
