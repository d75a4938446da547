"""Fix 17 (start-up time): SimpleTuner keeps its ~44 model families as lazy classes (``LazyModelClass``, from
``model_metadata.json``) so that a run imports only its own; but at import two listings ask every family an attribute
the metadata does not hold (the option registry's loss section: ``MODEL_TYPE``; ``configure.py``: ``supports_lora`` /
``supports_controlnet``), and each such question imports that family's model module, with its transformers and
diffusers classes and extra packages (the ACE-Step lyric tokenizer's spaCy, pypinyin, num2words). That was ~2.5 s of
the ~13 s SimpleTuner import on 2 cores, in every training and preview. Answer those three from the catalog
(``catalog.json`` ``model_families``, generated from the same SimpleTuner release and checked by a test) for a family
not loaded yet; a family that is loaded (the run's own) answers as itself. Only when the installed SimpleTuner is the
catalog's release and the catalog lists exactly its families. Left out then: the five aliases some families register
only when their module loads (``cosmos2image``, ``sd2x``, ...): sd3tune trains ``model_family sd3`` alone."""

from __future__ import annotations

import functools

from sd3tune.simpletuner.compat._patching import expect, replace

ANSWERED = ("MODEL_TYPE", "supports_lora", "supports_controlnet")


@functools.lru_cache(maxsize=1)
def _families() -> tuple[str, dict[str, dict]]:
    import json

    from sd3tune.simpletuner.catalog import CATALOG_PATH

    raw = json.loads(CATALOG_PATH.read_text())
    return raw["simpletuner_version"], raw.get("model_families", {})


def applies_to(registry) -> str | None:
    why = expect(registry, "LazyModelClass.__getattr__", ("self", "name"), source=("import_module",))
    if why:
        return why
    from importlib.metadata import version

    release, families = _families()
    if version("simpletuner") != release:
        return f"the catalog is of SimpleTuner {release}, not the installed {version('simpletuner')}"
    registry.ModelRegistry._load_metadata()
    if set(families) != set(registry.ModelRegistry._metadata):
        return "the catalog's model families are not SimpleTuner's (scripts/update_simpletuner_catalog.py)"
    return None


def apply(registry) -> None:
    _, families = _families()
    by_module = {meta["module_path"]: families[family] for family, meta in registry.ModelRegistry._metadata.items()}

    def answered(getattr_):
        def __getattr__(self, name):
            known = by_module.get(self._metadata.get("module_path")) if self._real_class is None else None
            if known is None or name not in ANSWERED:
                return getattr_(self, name)  # imports the family's module, as upstream
            value = known[name.lower()] if name == "MODEL_TYPE" else known[name]
            if value is None:  # the class has no such attribute (or its call raised): as upstream, for hasattr
                raise AttributeError(name)
            if name == "MODEL_TYPE":  # imported when asked: the registry loads before the models' common module
                from simpletuner.helpers.models.common import ModelTypes

                return ModelTypes(value)
            return lambda: value  # supports_lora() / supports_controlnet(), classmethods on the real class
        return __getattr__

    replace(registry.LazyModelClass, "__getattr__", answered)


def capabilities(model_class) -> dict:
    """What the catalog records of a family's real class (scripts/update_simpletuner_catalog.py)."""
    out = {"model_type": getattr(getattr(model_class, "MODEL_TYPE", None), "value", None)}
    for name in ANSWERED[1:]:
        try:
            out[name] = bool(getattr(model_class, name)()) if hasattr(model_class, name) else None
        except Exception:
            out[name] = None
    return out
