"""Evaluation metrics for `sd3tune evaluate`: how a LoRA (and its checkpoints) compares with the base model.

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
  The tables show this subset estimate; the difference against the base model (``stats.kid_paired``) is the same
  unbiased KID on all the images at once, bootstrapped over prompts, and can differ from the difference of the
  tables' subset means.
* **drift** on neutral prompts (no trigger word): per image, the style similarity minus the base model's for the same
  prompt and seed. Positive = the style leaks into prompts that did not ask for it.

Heavy libraries (torch, transformers, torchmetrics) are imported inside functions: the CLI imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sd3tune.errors import Sd3tuneError
from sd3tune.findings import plural

if TYPE_CHECKING:
    from sd3tune.clip import ClipModel
    from sd3tune.lora import LoraSource
    from sd3tune.prompts import EvalPrompt
    from sd3tune.simpletuner.layout import RunPaths

MAX_REAL_IMAGES = 500  # training images embedded for style similarity and KID (evenly spaced when more)
KID_SUBSETS = 100
KID_MAX_SUBSET = 1000
DEFINITIONS = {
    "clip_score": "prompt adherence: 100 * max(cos(CLIP image, CLIP prompt), 0) per image, all prompts (higher = "
                  "follows the prompt better)",
    "style_similarity": "cos(CLIP image, mean CLIP embedding of the training images) per image of a concept prompt "
                        "(higher = closer to the training style)",
    "diversity": "1 - cos between CLIP embeddings of two images of the same prompt (different seeds), every pair "
                 "(lower = more alike; a collapse towards one image shows as a drop)",
    "kid": "Kernel Inception Distance between concept-prompt images and the training images, torchmetrics "
           "KernelInceptionDistance on L2-normalised CLIP image embeddings (gamma 1, degree 3), mean and std over "
           "random subsets (lower = closer to the training distribution; not comparable with Inception-based KID); "
           "the difference against the base model is instead the unbiased KID of all the images at once (the one "
           "its bootstrap over prompts resamples), so it can differ from the difference of the two subset means",
    "neutral_style_similarity": "style similarity of the images of neutral prompts (prompts without the trigger)",
    "drift": "per neutral-prompt image: its style similarity minus the base model's for the same prompt and seed "
             "(0 = neutral prompts unaffected; positive = the style leaks into them)",
}
METRIC_ORDER = ("clip_score", "style_similarity", "diversity", "kid", "neutral_style_similarity", "drift")


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


# ----------------------------------------------------------------------------------------------- the models compared


@dataclass
class Candidate:
    """A model the evaluation compares: the base model, the LoRA, or one checkpoint's LoRA (its own adapter)."""

    label: str
    title: str
    kind: str
    step: int | None
    file: Path | None
    adapter: str | None
    sha256: str | None = None  # of ``file``: a retrain replaces the file at the same path


def checkpoint_steps(value: str) -> list[int] | None:
    """``--checkpoints N,M,...``: the steps, ascending and each once; None for ``latest`` / ``all``; ValueError for
    anything else."""
    if value in ("latest", "all"):
        return None
    steps = [int(part) for part in value.split(",")] if value else []
    if not steps or any(s < 0 for s in steps):
        raise ValueError(value)
    return sorted(set(steps))


def pick_candidates(lora: LoraSource, output_dir: Path, notes: list[str], which: str,
                    run_lora: bool) -> list[Candidate]:
    """The models to compare, the base model first, then the fine-tuned ones in training-step order (the final LoRA
    after its checkpoints): ``which`` is ``latest`` (``lora``), ``all`` (``lora`` and the LoRA of each checkpoint-N
    in ``output_dir``) or ``N,M,...`` (those checkpoints' LoRAs). A checkpoint with ``lora``'s very weights is
    ``lora``, evaluated once. ``run_lora``: ``lora`` is the run's own. What the comparison should know goes to
    ``notes``."""
    from sd3tune.fsutil import file_sha256
    from sd3tune.lora import checkpoint_loras, same_tensors, trained_otherwise
    from sd3tune.simpletuner.layout import checkpoint_step

    step = checkpoint_step(lora.file.parent)
    stamped = lora.metadata.get("sd3tune.steps", "")
    title = "LoRA" if step is None else f"LoRA (checkpoint-{step})"
    own = Candidate("lora", title, "lora", step if step is not None else int(stamped) if stamped.isdigit() else None,
                    lora.file, "sd3tune", lora.sha256)
    wanted = checkpoint_steps(which)
    found = {checkpoint_step(file.parent): file.resolve() for file in checkpoint_loras(output_dir)}
    if wanted is not None:
        missing = [s for s in wanted if s not in found]
        if missing:
            have = ", ".join(map(str, sorted(s for s in found if s is not None))) or "none"
            raise Sd3tuneError(f"--checkpoints {which}: no checkpoint-{missing[0]} with a LoRA in {output_dir}",
                               hint=f"the run's checkpoints are at steps: {have}; or pass latest or all")
        found = {s: f for s, f in found.items() if s in wanted}
    elif which == "latest":
        found = {}
    elif not [f for f in found.values() if f != lora.file]:
        notes.append("--checkpoints all: the run has no other checkpoint-N folder with a LoRA")
    out, has_own = [], wanted is None
    for s, file in sorted(found.items()):
        if file == lora.file or same_tensors(file, lora.file):  # the final LoRA is saved from the last weights
            what = "the final LoRA" if run_lora and step is None else f"the evaluated LoRA {lora.file}"
            if file != lora.file:
                notes.append(f"checkpoint-{s} is {what} (identical weights): evaluated once")
            has_own = True
            continue
        out.append(Candidate(f"checkpoint-{s}", f"checkpoint-{s}", "checkpoint", s, file, f"ckpt_{s}",
                             file_sha256(file)))
        notes += trained_otherwise(f"checkpoint-{s}", file, lora.metadata)
    out += [own] if has_own else []
    out.sort(key=lambda c: math.inf if c.step is None else c.step)  # stable: the final LoRA after a same-step one
    return [Candidate("base", "base", "base", None, None, None)] + out


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
    arrays: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> metric -> paired values (numpy)
    real: Any = None  # the training images' CLIP embeddings [N, d] (numpy), for KID's bootstrap


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
    arrays: dict[str, dict[str, Any]] = {}
    per_image: list[dict[str, Any]] = []
    base_style = embeddings[base] @ centroid
    for m in models:
        e = embeddings[m.label]
        style = e @ centroid  # [P, S]
        clip_scores = (100 * torch.clamp((e * text[:, None, :]).sum(-1), min=0)).tolist()
        pairs = [[1 - float(e[p, a] @ e[p, b]) for a in range(n_seeds) for b in range(a + 1, n_seeds)]
                 for p in range(n_prompts)]
        drift = (style - base_style)[neutral]
        arrays[m.label] = {"clip_score": torch.tensor(clip_scores).numpy(), "style_similarity": style[concept].numpy(),
                           "neutral_style_similarity": style[neutral].numpy(), "drift": drift.numpy(),
                           "diversity": [sum(row) / len(row) for row in pairs] if n_seeds > 1 else [],
                           "kid": e[concept].numpy()}
        out[m.label] = {
            "clip_score": stats([c for row in clip_scores for c in row]),
            "style_similarity": stats([float(style[p, s]) for p in concept for s in range(n_seeds)]),
            "diversity": stats([d for row in pairs for d in row]),
            "kid": kid_values.get(m.label, {"mean": None, "std": None, "n": 0}),
            "neutral_style_similarity": stats([float(style[p, s]) for p in neutral for s in range(n_seeds)]),
            "drift": stats(drift.flatten().tolist()),
        }
        for p in range(n_prompts):
            for s in range(n_seeds):
                per_image.append({"model": m.label, "prompt_index": p, "seed": seeds[s],
                                  "clip_score": clip_scores[p][s], "style_similarity": float(style[p, s])})
    return MetricsResult(out, per_image, reference, kid_info, notes, arrays, real.numpy())


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


def compare(models: Sequence[ModelImages], result: MetricsResult) -> dict[str, Any]:
    """Each fine-tuned candidate against the base model (``models[0]``), metric by metric, on the same prompts and
    seeds (``stats``' paired bootstrap); the best candidate (``stats.BEST_RULE``) and the headline in words."""
    from sd3tune import stats as st

    def versus(ref: str, label: str, metric: str) -> st.Comparison:
        a, b = result.arrays[ref], result.arrays[label]
        if metric == "kid":
            return st.kid_paired(a["kid"], b["kid"], result.real)
        return st.paired(metric, a[metric], b[metric])

    base, candidates = models[0].label, [m.label for m in models[1:]]
    vs_base = {label: {metric: versus(base, label, metric) for metric in METRIC_ORDER} for label in candidates}
    best = st.best_candidate(candidates, lambda a, b, metric: versus(b, a, metric))
    titles = {m.label: m.title for m in models}
    return {"vs_base": {label: {k: c.as_dict() for k, c in comparisons.items()} for label, comparisons in vs_base.items()},
            "best": {"label": best, "title": titles[best] if best else None, "rule": st.BEST_RULE},
            "headline": st.headline(titles, vs_base, best), "method": st.METHOD,
            "bootstrap": {"seed": st.BOOTSTRAP_SEED, "resamples": st.RESAMPLES, "level": st.LEVEL,
                          "min_paired_values": st.MIN_PAIRS}}
