"""Evaluation metrics and reports for `sd3tune evaluate`: how a LoRA (and its checkpoints) compares with the base model.

Every metric is computed from one CLIP model (``--clip-model``; a transformers ``CLIPModel`` folder or Hub id):

* **CLIP score** (prompt adherence), per image: ``100 * max(cos(image, prompt), 0)`` — the formula of torchmetrics'
  ``CLIPScore``. torchmetrics 1.9's ``CLIPScore`` cannot run with transformers 5 (``get_image_features`` returns an
  output object; Lightning-AI/torchmetrics#3407) and only returns a mean, so the same formula is applied here to the
  embeddings computed once per image; ``tests/test_evaluate.py`` checks it against torchmetrics' own implementation.
* **style similarity** (fidelity to the training images), per image of a concept prompt: cosine between the image's
  CLIP embedding and the mean embedding of the training images.
* **diversity**, per pair of images of the same prompt (different seeds): ``1 - cos``.
* **KID** to the training set: torchmetrics' ``KernelInceptionDistance`` (unbiased, subsets; reliable on small sets)
  with ``feature=`` a module returning L2-normalised CLIP image embeddings and ``gamma=1`` — not Inception-v3 features
  (their weights need torch-fidelity and a download), so the values are not comparable with published KID numbers.
* **drift** on neutral prompts (no trigger word): per image, the style similarity minus the base model's for the same
  prompt and seed. Positive = the style leaks into prompts that did not ask for it.

Heavy libraries (torch, transformers, torchmetrics) are imported inside functions: the CLI imports this module.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sd3tune.defaults import DEFAULT_CLIP
from sd3tune.errors import Sd3tuneError
from sd3tune.findings import plural

if TYPE_CHECKING:
    from sd3tune.simpletuner.files import RunPaths

NEUTRAL_PREFIX = "neutral:"
NEUTRAL_PROMPTS = (
    "a photograph of a red apple on a wooden table",
    "a photo of a busy city street in daylight",
    "a portrait photograph of an elderly man",
)
CAPTION_PROMPTS = 3  # training captions used as concept prompts by default
MAX_REAL_IMAGES = 500  # training images embedded for style similarity and KID (evenly spaced when more)
KID_SUBSETS = 100
KID_MAX_SUBSET = 1000
TIE_TOLERANCE = 1e-6

BEST_RULE = ("best = the LoRA candidate (the final LoRA and each evaluated checkpoint; never the base model) with the "
             "highest mean of two z-scores taken across the candidates: mean CLIP score and mean style similarity "
             "(a metric equal for all candidates counts 0); ties (within 1e-6) go to the later training step")

DEFINITIONS = {
    "clip_score": "prompt adherence: 100 * max(cos(CLIP image, CLIP prompt), 0) per image, all prompts (higher = "
                  "follows the prompt better)",
    "style_similarity": "cos(CLIP image, mean CLIP embedding of the training images) per image of a concept prompt "
                        "(higher = closer to the training style)",
    "diversity": "1 - cos between CLIP embeddings of two images of the same prompt (different seeds), every pair "
                 "(lower = more alike; a collapse towards one image shows as a drop)",
    "kid": "Kernel Inception Distance between concept-prompt images and the training images, torchmetrics "
           "KernelInceptionDistance on L2-normalised CLIP image embeddings (gamma 1, degree 3), mean and std over "
           "random subsets (lower = closer to the training distribution; not comparable with Inception-based KID)",
    "neutral_style_similarity": "style similarity of the images of neutral prompts (prompts without the trigger)",
    "drift": "per neutral-prompt image: its style similarity minus the base model's for the same prompt and seed "
             "(0 = neutral prompts unaffected; positive = the style leaks into them)",
}
METRIC_ORDER = ("clip_score", "style_similarity", "diversity", "kid", "neutral_style_similarity", "drift")


# ----------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class EvalPrompt:
    text: str
    kind: Literal["concept", "neutral"]


def read_prompts_file(path: Path, trigger: str | None) -> list[EvalPrompt]:
    """One prompt per line (``#`` comments). ``neutral: TEXT`` marks a neutral prompt; when the run has a trigger
    word, a prompt without it is neutral too; every other prompt is a concept prompt."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise Sd3tuneError(f"prompts file {path} is a folder, not a file",
                           hint="pass a text file with one prompt per line")
    if not path.is_file():
        raise Sd3tuneError(f"prompts file {path} does not exist",
                           hint="one prompt per line; prefix neutral prompts with 'neutral:'")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: Notepad's BOM is not part of line 1
    except UnicodeDecodeError:
        raise Sd3tuneError(f"prompts file {path} is not UTF-8 text", hint="one prompt per line") from None
    prompts: list[EvalPrompt] = []
    for line in lines:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.lower().startswith(NEUTRAL_PREFIX):
            text = text[len(NEUTRAL_PREFIX):].strip()
            if text:
                prompts.append(EvalPrompt(text, "neutral"))
            continue
        neutral = bool(trigger) and trigger.lower() not in text.lower()  # type: ignore[union-attr]
        prompts.append(EvalPrompt(text, "neutral" if neutral else "concept"))
    if not prompts:
        raise Sd3tuneError(f"prompts file {path} has no prompts", hint="one prompt per line (# starts a comment)")
    return prompts


def default_prompts(validation_prompt: str | None, captions: Sequence[str], trigger: str | None,
                    n_captions: int = CAPTION_PROMPTS) -> list[EvalPrompt]:
    """The run's validation prompt and a few of its training captions (concept prompts), plus neutral prompts."""
    concept: list[str] = [validation_prompt] if validation_prompt else []
    distinct = [c for c in dict.fromkeys(" ".join(c.split()) for c in captions if c and c.strip())
                if c not in concept]
    if distinct and n_captions > 0:
        step = len(distinct) / min(n_captions, len(distinct))
        concept += [distinct[int(i * step)] for i in range(min(n_captions, len(distinct)))]
    if not concept and trigger:
        concept.append(trigger)
    if not concept:
        raise Sd3tuneError("the run has no validation prompt, captions or trigger word to build concept prompts from",
                           hint="pass --prompts FILE (one prompt per line)")
    return distinct_prompts([EvalPrompt(c, "concept") for c in concept]
                            + [EvalPrompt(n, "neutral") for n in NEUTRAL_PROMPTS])[0]


def distinct_prompts(prompts: Sequence[EvalPrompt]) -> tuple[list[EvalPrompt], int]:
    """Each prompt text once, at its first place (as its first line marks it); and how many repeats were left out."""
    first: dict[str, EvalPrompt] = {}
    for p in prompts:
        first.setdefault(p.text, p)
    return list(first.values()), len(prompts) - len(first)


# ----------------------------------------------------------------------------------------------- training data


@dataclass
class TrainingSet:
    folders: list[Path]
    images: list[Path]  # the ones used (at most MAX_REAL_IMAGES, evenly spaced)
    total: int
    captions: list[str] = field(default_factory=list)


def training_set(backends: Iterable[Any] | None, paths: RunPaths, max_images: int = MAX_REAL_IMAGES) -> TrainingSet:
    """The training images (and captions) of a run's enabled, non-regularisation image datasets (``paths``: the
    run's, which relative image folders are read from)."""
    from sd3tune.datascan import scan_folder
    from sd3tune.simpletuner.dataset import dataset_captions

    folders, images, captions = [], [], []
    for b in backends or []:
        if getattr(b, "dataset_type", None) != "image" or b.disabled or b.is_regularisation_data:
            continue
        folder = paths.resolve(b.instance_data_dir)
        if not folder.is_dir():
            raise Sd3tuneError(f"training image folder {folder} (dataset {b.id!r}) does not exist",
                               hint="style similarity and KID compare with the training images; restore the folder "
                                    "or fix instance_data_dir in config/multidatabackend.json")
        folders.append(folder)
        scan = scan_folder(folder)
        images += [i.path for i in scan.images]
        captions += dataset_captions(b.caption_strategy, b.instance_prompt, scan.images)
    if not folders:
        raise Sd3tuneError("the run has no enabled image dataset", hint="check config/multidatabackend.json")
    if not images:
        raise Sd3tuneError(f"no readable training images in {', '.join(map(str, folders))}",
                           hint="style similarity and KID compare with the training images")
    total = len(images)
    if total > max_images:
        images = [images[int(i * total / max_images)] for i in range(max_images)]
    return TrainingSet(folders, images, total, captions)


class ImageFiles(Sequence):
    """Image files opened (as RGB) only when indexed, so a large training set is never all in memory."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):  # type: ignore[override]
        from PIL import Image

        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        with Image.open(self.paths[index]) as im:
            return im.convert("RGB")


# ----------------------------------------------------------------------------------------------- CLIP


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
        from transformers import CLIPModel, CLIPProcessor

        from sd3tune.inference import quiet_libraries

        quiet_libraries()
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
        hub_hint = (f"offline or not downloaded? fetch it once with `hf download {spec}`, or pass --clip-model PATH "
                    "to a local CLIP folder")
        local_only = False
        if source == "Hub":  # fail fast, not after a minute of huggingface_hub's retries, when the Hub is out of reach
            from sd3tune.inference import hub_files_only

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


# ----------------------------------------------------------------------------------------------- metrics


@dataclass
class ModelImages:
    """The images one model (base, the LoRA or a checkpoint) made: ``images[p][s]`` for prompt p and seed s."""

    label: str
    title: str
    kind: Literal["base", "lora", "checkpoint"]
    step: int | None
    lora_file: Path | None
    adapter_weight: float
    images: list[list[Any]]
    paths: list[list[Path]] = field(default_factory=list)


def stats(values: Sequence[float]) -> dict[str, Any]:
    """mean, sample standard deviation (0 for one value) and count; None when there are no values."""
    vals = [float(v) for v in values]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(vals)}


@dataclass
class MetricsResult:
    models: dict[str, dict[str, Any]]  # label -> metric -> stats
    per_image: list[dict[str, Any]]
    reference: dict[str, Any]
    kid: dict[str, Any]
    notes: list[str]


def compute_metrics(models: Sequence[ModelImages], prompts: Sequence[EvalPrompt], seeds: Sequence[int],
                    real_images: Sequence[Any], clip: ClipModel, progress: bool = True,
                    batch_size: int = 16) -> MetricsResult:
    """Every metric for every model; ``models[0]`` must be the base model (the reference for drift)."""
    import torch

    notes: list[str] = []
    n_prompts, n_seeds = len(prompts), len(seeds)
    concept = [i for i, p in enumerate(prompts) if p.kind == "concept"]
    neutral = [i for i, p in enumerate(prompts) if p.kind == "neutral"]
    if not concept:
        notes.append("no concept prompts: style similarity and KID were not computed")
    if not neutral:
        notes.append("no neutral prompts: drift was not computed")
    if n_seeds < 2:
        notes.append("one seed per prompt: diversity was not computed (use --seeds 2 or more)")
    long = clip.truncated([p.text for p in prompts])
    if long:
        notes.append(f"{plural(len(long), 'prompt')} longer than CLIP's {clip.max_text_tokens} tokens: "
                     f"{'its' if len(long) == 1 else 'their'} CLIP score reads only the start")

    real = clip.image_embeddings(real_images, batch_size, "CLIP training images", progress)
    centroid = torch.nn.functional.normalize(real.mean(0), dim=0)
    text = clip.text_embeddings([p.text for p in prompts])
    reference = {"training_style_similarity": stats((real @ centroid).tolist()), "training_images": len(real_images)}

    embeddings: dict[str, Any] = {}
    for m in models:
        flat = [m.images[p][s] for p in range(n_prompts) for s in range(n_seeds)]
        embeddings[m.label] = clip.image_embeddings(flat, batch_size, f"CLIP {m.label}", progress).view(
            n_prompts, n_seeds, -1)

    kid_info, kid_values = _kid(models, concept, n_seeds, real, embeddings, clip.name, notes)

    base = models[0].label
    out: dict[str, dict[str, Any]] = {}
    per_image: list[dict[str, Any]] = []
    base_style = embeddings[base] @ centroid
    for m in models:
        e = embeddings[m.label]
        style = e @ centroid  # [P, S]
        clip_scores = (100 * torch.clamp((e * text[:, None, :]).sum(-1), min=0)).tolist()
        pairs = [1 - float(e[p, a] @ e[p, b]) for p in range(n_prompts) for a in range(n_seeds)
                 for b in range(a + 1, n_seeds)]
        out[m.label] = {
            "clip_score": stats([c for row in clip_scores for c in row]),
            "style_similarity": stats([float(style[p, s]) for p in concept for s in range(n_seeds)]),
            "diversity": stats(pairs),
            "kid": kid_values.get(m.label, {"mean": None, "std": None, "n": 0}),
            "neutral_style_similarity": stats([float(style[p, s]) for p in neutral for s in range(n_seeds)]),
            "drift": stats([float(style[p, s] - base_style[p, s]) for p in neutral for s in range(n_seeds)]),
        }
        for p in range(n_prompts):
            for s in range(n_seeds):
                per_image.append({"model": m.label, "prompt_index": p, "seed": seeds[s],
                                  "clip_score": clip_scores[p][s], "style_similarity": float(style[p, s])})
    return MetricsResult(out, per_image, reference, kid_info, notes)


def _kid(models: Sequence[ModelImages], concept: list[int], n_seeds: int, real: Any, embeddings: dict[str, Any],
         clip_name: str, notes: list[str]) -> tuple[dict, dict]:
    """KID of each model's concept-prompt images against the training images, on the CLIP embeddings already
    computed for the other metrics (``real``: [N, d]; ``embeddings[label]``: [prompts, seeds, d])."""
    import warnings

    import torch
    from torchmetrics.image.kid import KernelInceptionDistance

    n_real = len(real)
    n_fake = len(concept) * n_seeds
    subset = min(n_real, n_fake, KID_MAX_SUBSET)
    info = {"feature": f"CLIP image embeddings of {clip_name}, L2-normalised", "subsets": KID_SUBSETS,
            "subset_size": subset, "degree": 3, "gamma": 1.0, "real_images": n_real,
            "fake_images_per_model": n_fake, "seed": 0}
    if subset < 2:
        notes.append(f"KID needs at least 2 concept-prompt images and 2 training images (have {n_fake} and "
                     f"{n_real}): not computed")
        return info, {}
    if subset < 50:
        notes.append(f"KID on {subset}-image subsets: a rough estimate (more concept prompts or --seeds narrow it)")
    single = n_real == subset and n_fake == subset  # every random subset is the whole set: one value, no spread
    if single:
        notes.append(f"KID: {subset} training and {subset} concept-prompt images, so every subset is all of them: "
                     "one value, without a standard deviation")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the features are given: KID's own feature network is the identity
        kid = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=KID_SUBSETS, subset_size=subset,
                                      gamma=1.0, reset_real_features=False)
    values: dict[str, dict] = {}
    with torch.inference_mode():
        kid.update(real, real=True)
        for m in models:
            e = embeddings[m.label]
            kid.update(e[concept].reshape(-1, e.shape[-1]), real=False)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # the same random subsets for every model
                mean, std = kid.compute()
            values[m.label] = {"mean": float(mean), "std": 0.0, "n": 1} if single else \
                {"mean": float(mean), "std": float(std), "n": KID_SUBSETS}
            kid.reset()  # keeps the real features
    return info, values


def pick_best(models: Sequence[ModelImages], metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Apply BEST_RULE to the LoRA candidates; returns the winner, the rule and every candidate's score."""
    candidates = [m for m in models if m.kind != "base"]
    if not candidates:
        return {"label": None, "title": None, "rule": BEST_RULE, "scores": {}}
    z: dict[str, float] = {m.label: 0.0 for m in candidates}
    used = []
    for metric in ("clip_score", "style_similarity"):
        vals = {m.label: metrics[m.label][metric]["mean"] for m in candidates}
        if any(v is None for v in vals.values()):
            continue
        used.append(metric)
        mean = sum(vals.values()) / len(vals)
        sd = math.sqrt(sum((v - mean) ** 2 for v in vals.values()) / len(vals))
        for label, v in vals.items():
            z[label] += (v - mean) / sd if sd > 1e-12 else 0.0
    scores = {k: v / max(len(used), 1) for k, v in z.items()}
    order = {m.label: (i, m.step) for i, m in enumerate(candidates)}

    def step_key(label: str) -> float:
        i, step = order[label]
        return math.inf if step is None else float(step)

    top = max(scores.values())
    tied = [label for label, s in scores.items() if top - s <= TIE_TOLERANCE]
    best = max(tied, key=lambda label: (step_key(label), order[label][0]))
    title = candidates[order[best][0]].title  # as the tables name it (the label is the images/ folder's name)
    return {"label": best, "title": title, "rule": BEST_RULE, "metrics_used": used, "scores": scores}


# ----------------------------------------------------------------------------------------------- report


def fmt(stat: dict[str, Any] | None, digits: int = 3) -> str:
    """``mean ± std``; the mean alone when it is a single value (n 1: no spread to show). A value that rounds to
    zero shows as 0, never -0."""
    if not stat or stat.get("mean") is None:
        return "n/a"
    mean = _rounded(stat["mean"], digits)
    if stat.get("n") == 1 or stat.get("std") is None:
        return mean
    return f"{mean} ± {_rounded(stat['std'], digits)}"


def _rounded(value: float, digits: int) -> str:
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _title(data: dict[str, Any], label: str | None) -> str:
    """A model's name as the tables show it (its title), from its label."""
    model = data["models"].get(label) if label is not None else None
    return model["title"] if model else str(label)


TABLE_COLUMNS = (("clip_score", "CLIP score ↑", 2), ("style_similarity", "style sim. ↑", 3),
                 ("diversity", "diversity", 3), ("kid", "KID ↓", 4), ("drift", "neutral drift", 3))


def render_markdown(data: dict[str, Any], sheet_name: str) -> str:
    """The report: settings, the contact sheet, the metric table, the best checkpoint and what each number means."""
    lines = [f"# sd3tune evaluation: {data['run_dir']}", ""]
    lines += [f"- base model: `{data['model']}`",
              f"- LoRA: `{data['lora']['file']}` (sha256 `{data['lora']['sha256'][:12]}`)",
              f"- CLIP model for the metrics: `{data['clip_model']['name']}` ({data['clip_model']['source']})",
              f"- sampler: {_sampler_text(data['sampler'])}",
              f"- seeds per prompt: {', '.join(map(str, data['seeds']))}",
              f"- training images: {data['training_images']['used']} of {data['training_images']['total']} in "
              + ", ".join(f"`{f}`" for f in data["training_images"]["folders"]),
              f"- sd3tune {data['sd3tune_version']}, {data['created']}", ""]
    lines += ["## Prompts", ""]
    for i, p in enumerate(data["prompts"]):
        lines.append(f"{i + 1}. ({p['kind']}) {_md(p['text'])}")
    lines += ["", "## Images", "",
              f"Rows: prompts (seed {data['seeds'][0]}); columns: {' | '.join(m['title'] for m in data['models'].values())}. "
              "Every image is under `images/`.", "", f"![contact sheet]({sheet_name})", ""]
    lines += ["## Metrics (mean ± std)", ""]
    header = ["model"] + [c[1] for c in TABLE_COLUMNS]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = data["best"]["label"]
    for label, m in data["models"].items():
        name = m["title"] + (" **(best)**" if label == best else "")
        lines.append("| " + " | ".join([name] + [fmt(m["metrics"][k], d) for k, _, d in TABLE_COLUMNS]) + " |")
    ref = data["reference"]["training_style_similarity"]
    lines += ["", f"Reference: the training images' own style similarity is {fmt(ref)}.", ""]
    lines += ["## Best checkpoint", "", f"**{_title(data, best)}** — {data['best']['rule']}.", ""]
    if data["best"]["scores"]:
        lines += ["| candidate | score |", "|---|---|"]
        lines += [f"| {_title(data, k)} | {v:+.3f} |" for k, v in data["best"]["scores"].items()]
        lines.append("")
    lines += ["## What the numbers mean", ""]
    lines += [f"- **{k}**: {v}" for k, v in data["definitions"].items()]
    lines += ["- std is the sample standard deviation across prompts and seeds (KID: across random subsets); a value "
              "without ± is a single one (n = 1)."]
    if data["notes"]:
        lines += ["", "## Notes", ""] + [f"- {_md(n)}" for n in data["notes"]]
    return "\n".join(lines) + "\n"


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|<>~])")


def _md(text: str) -> str:
    """``text`` as Markdown shows it literally (a prompt's ``*``, ``<b>`` or ``|`` is not markup)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def render_html(data: dict[str, Any], sheet_name: str) -> str:
    """A self-contained HTML page with the same table and the contact sheet (for a browser)."""
    e = html.escape
    rows = []
    best = data["best"]["label"]
    for label, m in data["models"].items():
        cells = "".join(f"<td>{e(fmt(m['metrics'][k], d))}</td>" for k, _, d in TABLE_COLUMNS)
        mark = " <b>(best)</b>" if label == best else ""
        rows.append(f"<tr><td>{e(m['title'])}{mark}</td>{cells}</tr>")
    head = "".join(f"<th>{e(c[1])}</th>" for c in TABLE_COLUMNS)
    prompts = "".join(f"<li>({e(p['kind'])}) {e(p['text'])}</li>" for p in data["prompts"])
    defs = "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in data["definitions"].items())
    notes = "".join(f"<li>{e(n)}</li>" for n in data["notes"])
    return (f"<!doctype html><meta charset='utf-8'><title>sd3tune evaluation</title>"
            f"<style>body{{font-family:sans-serif;max-width:1100px}}td,th{{padding:4px 8px;border:1px solid #ccc}}"
            f"table{{border-collapse:collapse}}</style>"
            f"<h1>sd3tune evaluation</h1><p>{e(data['run_dir'])}<br>base <code>{e(data['model'])}</code>, LoRA "
            f"<code>{e(data['lora']['file'])}</code> (sha256 <code>{e(data['lora']['sha256'][:12])}</code>), "
            f"CLIP <code>{e(data['clip_model']['name'])}</code><br>"
            f"{e(_sampler_text(data['sampler']))}; seeds {e(', '.join(map(str, data['seeds'])))}</p>"
            f"<h2>Prompts</h2><ol>{prompts}</ol><h2>Images</h2><img src='{e(sheet_name)}'>"
            f"<h2>Metrics (mean ± std)</h2><table><tr><th>model</th>{head}</tr>{''.join(rows)}</table>"
            f"<h2>Best checkpoint</h2><p><b>{e(_title(data, best))}</b> — {e(data['best']['rule'])}.</p>"
            f"<h2>What the numbers mean</h2><ul>{defs}</ul>" + (f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""))


def _sampler_text(s: dict[str, Any]) -> str:
    return (f"{s['steps']} steps, CFG {s['guidance']}, {s['width']}x{s['height']}, T5 length "
            f"{s['max_sequence_length']}, shift {s['shift']}")


def dumps(data: dict[str, Any]) -> str:
    """JSON with no NaN/Infinity (they are not JSON): a missing value is null."""
    return json.dumps(_finite(data), indent=2, allow_nan=False) + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def relpath(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path, start)
    except ValueError:
        return str(path)
