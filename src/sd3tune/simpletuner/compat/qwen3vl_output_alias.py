"""Fix 1: transformers >= 5.23 removed ``Qwen3VLCausalLMOutputWithPast``; SimpleTuner's vendored mageflow imports it
and the field registry imports every model family at start-up, so the ImportError kills every run (SD3 too). Alias it
to ``MultimodalCausalLMOutputWithPast`` when missing (our pin keeps it; this guards user upgrades)."""

from __future__ import annotations

OLD, NEW = "Qwen3VLCausalLMOutputWithPast", "MultimodalCausalLMOutputWithPast"


def applies_to(module) -> str | None:
    if hasattr(module, OLD) or hasattr(module, NEW):
        return None
    return f"{module.__name__} has neither {OLD} nor {NEW}"


def apply(module) -> None:
    if not hasattr(module, OLD) and hasattr(module, NEW):
        setattr(module, OLD, getattr(module, NEW))
