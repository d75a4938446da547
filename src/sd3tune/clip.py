"""The CLIP model `sd3tune evaluate` scores images with (``--clip-model``: a transformers ``CLIPModel`` folder or Hub
id): loading it, refusing half a CLIP (a text encoder alone) before any weights load, and unit-norm embeddings.
transformers and torch load inside the functions."""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sd3tune.defaults import DEFAULT_CLIP
from sd3tune.errors import Sd3tuneError


def _looks_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or Path(spec).expanduser().exists() or spec.count("/") > 1 or "\\" in spec


_FULL_CLIP_HINT = (f"the metrics need both CLIP towers: pass a transformers CLIPModel folder (config.json model_type "
                   f"'clip', e.g. a download of {DEFAULT_CLIP}); a text_encoder folder (as in SD3) is only the text "
                   "half")


def _check_clip_config(config_file: Path, what: str, fix: str) -> None:
    """Refuse, before loading any weights, a folder whose config.json is not a full CLIP model (vision + text), e.g.
    a CLIP text encoder (model_type 'clip_text_model', the text_encoder folder of an SD3 model). A config that says
    nothing either way goes on to the loader, whose errors are caught too."""
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Sd3tuneError(f"{what}: {config_file} is not readable JSON ({type(exc).__name__})",
                           hint=_FULL_CLIP_HINT + fix) from None
    if not isinstance(config, dict):
        raise Sd3tuneError(f"{what}: {config_file} is not a model config", hint=_FULL_CLIP_HINT + fix)
    model_type = config.get("model_type")
    architectures = [str(a) for a in config.get("architectures") or []]
    if (model_type is not None and model_type != "clip") or (
            model_type is None and architectures and "CLIPModel" not in architectures):
        found = f"model_type {model_type!r}" + (f", architectures {', '.join(architectures)}" if architectures else "")
        raise Sd3tuneError(f"{what} is not a full CLIP model (vision + text): its config.json has {found}",
                           hint=_FULL_CLIP_HINT + fix)


class ClipModel:
    """A transformers CLIP model and processor, loaded from a folder or a Hub id; unit-norm embeddings."""

    def __init__(self, model: Any, processor: Any, name: str, source: str) -> None:
        self.model = model
        self.processor = processor
        self.name = name
        self.source = source  # "local folder" or "Hub"
        self.device = "cpu"

    @classmethod
    def load(cls, spec: str, origin: str | None = None) -> "ClipModel":
        """Load ``spec`` (a local folder or a Hub id). ``origin`` names where the spec came from when the user did
        not pass --clip-model (e.g. the run's sd3tune.json): the error messages then say so."""
        from sd3tune.runtime import quiet_libraries

        quiet_libraries()  # first: before transformers' import
        from transformers import CLIPModel, CLIPProcessor

        what = f"--clip-model {spec}" if origin is None else f"CLIP model {spec} (from {origin})"
        fix = "" if origin is None else "; or pass --clip-model PATH|HUB_ID"
        local = Path(spec).expanduser()
        if _looks_local(spec):
            if not local.exists():
                hint = f"a local transformers CLIP folder, or a Hub id such as {DEFAULT_CLIP}"
                raise Sd3tuneError(f"{what} does not exist", hint=("pass " if origin is None else "pass --clip-model: ")
                                   + hint)
            if not (local / "config.json").is_file():
                raise Sd3tuneError(f"{what} is not a transformers model folder (no config.json)",
                                   hint="save one with CLIPModel.save_pretrained and CLIPProcessor.save_pretrained"
                                        + fix)
            _check_clip_config(local / "config.json", what, fix)
            target, source = str(local.resolve()), "local folder"
        else:
            target, source = spec, "Hub"
        hub_hint = (f"offline or not downloaded? fetch it once with `hf download {shlex.quote(spec)}`, or pass "
                    "--clip-model PATH to a local CLIP folder")
        local_only = False
        if source == "Hub":  # fail fast, not after a minute of huggingface_hub's retries, when the Hub is out of reach
            from sd3tune.hub import hub_files_only

            local_only = hub_files_only(spec, f"CLIP model {spec}" + ("" if origin is None else f" (from {origin})"),
                                        "config.json", hint=hub_hint)
        try:
            model = CLIPModel.from_pretrained(target, local_files_only=local_only).eval()
            processor = CLIPProcessor.from_pretrained(target, local_files_only=local_only)
        except RuntimeError as exc:  # e.g. a text encoder alone: transformers reports mismatched/missing weights
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise Sd3tuneError(f"{what} cannot be loaded as a full CLIP model (vision + text): {first}",
                               hint=_FULL_CLIP_HINT + fix) from None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if source == "Hub":
                hint = hub_hint
            else:
                hint = "the folder must hold a transformers CLIP model and its processor (save_pretrained)" + fix
            raise Sd3tuneError(f"cannot load CLIP model {spec}: {first}"
                               + ("" if origin is None else f" (from {origin})"), hint=hint) from None
        model.requires_grad_(False)
        return cls(model, processor, target, source)

    def to(self, device: str) -> "ClipModel":
        self.model.to(device)
        self.device = device
        return self

    @property
    def max_text_tokens(self) -> int:
        return int(getattr(self.model.config.text_config, "max_position_embeddings", 77))

    def pixel_values(self, images: Sequence[Any]):
        return self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]

    def image_embeddings(self, images: Sequence[Any], batch_size: int = 16, desc: str = "CLIP images",
                         progress: bool = True):
        """L2-normalised CLIP image embeddings, on the CPU, one row per image."""
        import torch
        from tqdm.auto import tqdm

        out = []
        with torch.inference_mode(), tqdm(total=len(images), unit="img", desc=desc, disable=not progress) as bar:
            for i in range(0, len(images), batch_size):
                batch = images[i:i + batch_size]
                feats = self.model.get_image_features(pixel_values=self.pixel_values(batch).to(self.device))
                feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
                out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
                bar.update(len(batch))
        return torch.cat(out) if out else torch.zeros(0, 0)

    def text_embeddings(self, texts: Sequence[str]):
        import torch

        tokens = self.processor.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_text_tokens,
                                          return_tensors="pt")
        with torch.inference_mode():
            out = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                               attention_mask=tokens["attention_mask"].to(self.device))
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()

    def truncated(self, texts: Sequence[str]) -> list[str]:
        """The prompts longer than the CLIP text encoder reads (their CLIP score sees only the start)."""
        ids = self.processor.tokenizer(list(texts))["input_ids"]
        return [t for t, i in zip(texts, ids) if len(i) > self.max_text_tokens]
