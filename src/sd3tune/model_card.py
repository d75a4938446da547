"""The model card (``README.md``) `sd3tune export` writes beside an exported LoRA, in Hugging Face's LoRA conventions:
YAML front matter (``base_model`` as a Hub id, ``base_model_relation: adapter``, ``library_name``, the base model's
licence with its name and link, ``tags``, ``instance_prompt`` = the trigger, ``widget`` samples), then how it trained,
its evaluation, and how to load each file: diffusers (at the right scale), ComfyUI and Forge.

SimpleTuner's own card (``output/README.md``) says ``base_model: sd3/unknown-model`` for a local model, ``license:
other`` with no name or link, no trigger, no samples without validation, a ``not-for-all-audiences`` tag by default
and a snippet at scale 1 whatever the alpha; this one is written from what the LoRA file and the run record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# Stable Diffusion 3 Medium's licence, as its Hub card names it (license: other + name + link)
SD3_LICENSE = {"license": "other", "license_name": "stabilityai-ai-community",
               "license_link": "https://stability.ai/community-license-agreement"}
TAGS = ["text-to-image", "diffusers", "lora", "template:sd-lora", "sd3", "sd3-diffusers", "stable-diffusion",
        "sd3tune"]
METRICS = {"clip_score": "CLIP score", "style_similarity": "style similarity", "kid": "KID", "drift": "drift"}


@dataclass
class Sample:
    image: str  # path relative to the card
    prompt: str


@dataclass
class CardFacts:
    """What the card says: from the LoRA's stamp, the run and its evaluation."""

    title: str
    base_model: str  # a Hub id
    trigger: str | None
    strength: float  # alpha / rank
    rank: int | None
    alpha: float | None
    steps: str | None
    resolution: str | None
    images: int | None  # training images
    t5_max_length: int | None
    schedule_shift: float | None
    diffusers_file: str | None  # file names in the export folder
    kohya_file: str | None
    repo_id: str | None = None  # where it is pushed, for the snippet
    samples: list[Sample] = field(default_factory=list)
    evaluation: dict[str, dict[str, float]] = field(default_factory=dict)  # model title -> metric -> mean
    sd3tune_version: str = ""


def front_matter(facts: CardFacts) -> dict[str, Any]:
    data: dict[str, Any] = {"base_model": facts.base_model, "base_model_relation": "adapter",
                            "library_name": "diffusers", **SD3_LICENSE, "tags": TAGS,
                            "pipeline_tag": "text-to-image"}
    if facts.trigger:
        data["instance_prompt"] = facts.trigger
    if facts.samples:
        data["widget"] = [{"text": s.prompt, "output": {"url": s.image}} for s in facts.samples]
    return data


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000)


def render_card(facts: CardFacts) -> str:
    location = facts.repo_id or "PATH/TO/THIS/FOLDER"
    prompt = f"{facts.trigger}, " if facts.trigger else ""
    lines = ["---", _yaml(front_matter(facts)).rstrip(), "---", "", f"# {facts.title}", "",
             f"A LoRA for [{facts.base_model}](https://huggingface.co/{facts.base_model}), trained with "
             f"sd3tune {facts.sd3tune_version} (through [SimpleTuner](https://github.com/bghira/SimpleTuner)).", ""]
    if facts.trigger:
        lines += [f"Trigger word: `{facts.trigger}` — put it in the prompt.", ""]
    lines += ["## Training", "", "| steps | rank | alpha | strength (alpha / rank) | resolution | training images |",
              "|---|---|---|---|---|---|",
              f"| {_cell(facts.steps)} | {_cell(facts.rank)} | {_cell(facts.alpha)} | {facts.strength:g} | "
              f"{_cell(facts.resolution)} | {_cell(facts.images)} |", ""]
    if facts.evaluation:
        names = [m for m in METRICS if any(m in v for v in facts.evaluation.values())]
        lines += ["## Evaluation (`sd3tune evaluate`)", "", "| model | " + " | ".join(METRICS[m] for m in names) + " |",
                  "|---|" + "---|" * len(names)]
        lines += [f"| {title} | " + " | ".join(_cell(v.get(m)) for m in names) + " |"
                  for title, v in facts.evaluation.items()]
        lines += [""]
    if facts.samples:
        lines += ["## Samples", ""] + [f"![{s.prompt}]({s.image})" for s in facts.samples] + [""]
    lines += ["## Files", ""]
    if facts.diffusers_file:
        lines += [f"- `{facts.diffusers_file}`: diffusers / PEFT keys. Its `lora_adapter_metadata` holds alpha and "
                  f"rank, so diffusers applies the trained strength ({facts.strength:g} × B·A) by itself."]
    if facts.kohya_file:
        lines += [f"- `{facts.kohya_file}`: kohya keys (`lora_unet_joint_blocks_…`, q/k/v fused, `.alpha` per "
                  "layer) for ComfyUI, Forge, A1111 and sd-scripts; alpha / rank gives the same strength."]
    lines += [""]
    if facts.diffusers_file:
        extra = [f"max_sequence_length={facts.t5_max_length}"] if facts.t5_max_length else []
        shift = []
        if facts.schedule_shift is not None and facts.schedule_shift != 3.0:
            shift = ["from diffusers import FlowMatchEulerDiscreteScheduler",
                     "pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, "
                     f"shift={facts.schedule_shift:g})  # as trained"]
        lines += ["## Use with diffusers", "", "```python", "import torch",
                  "from diffusers import StableDiffusion3Pipeline", "",
                  f"pipe = StableDiffusion3Pipeline.from_pretrained({json.dumps(facts.base_model)}, "
                  "torch_dtype=torch.bfloat16).to(\"cuda\")",
                  f"pipe.load_lora_weights({json.dumps(location)}, weight_name={json.dumps(facts.diffusers_file)})",
                  *shift,
                  f"# scale 1.0 = the trained strength: the file carries alpha / rank ({facts.strength:g}) and "
                  "diffusers applies it",
                  f"image = pipe({json.dumps(prompt + 'concept art of a castle')}, num_inference_steps=28, "
                  f"guidance_scale=7.0, {', '.join(extra + [''])}joint_attention_kwargs={{\"scale\": 1.0}}).images[0]",
                  "```", "",
                  f"Do not multiply the scale by alpha / rank yourself: diffusers already does (from "
                  f"`lora_adapter_metadata`); `scale` is relative to the trained strength.", ""]
    if facts.kohya_file:
        name = facts.kohya_file.removesuffix(".safetensors")
        lines += ["## Use in ComfyUI or Forge", "",
                  f"- **ComfyUI**: copy `{facts.kohya_file}` into `ComfyUI/models/loras/`, add a *LoraLoaderModelOnly* "
                  "node between the SD3 Medium checkpoint loader and the sampler, `strength_model` 1.0 (the file's "
                  "`.alpha` gives the trained strength).",
                  f"- **Forge** (or another WebUI that runs SD3): copy it into `models/Lora/` and add "
                  f"`<lora:{name}:1>` to the prompt.", ""]
    return "\n".join(lines).rstrip() + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ----------------------------------------------------------------------------------------------- from the run

MAX_SAMPLES = 4


def evaluation_facts(run_dir, lora_sha256: str) -> tuple[dict[str, dict[str, float]], list[tuple[Any, str]]]:
    """From the newest `sd3tune evaluate` of this very LoRA file (the run's sd3tune.json ``evaluations``, matched by
    SHA-256: a retrained LoRA's numbers are not this one's): each model's metric means, and the LoRA column's first
    image of each concept prompt with its prompt."""
    from pathlib import Path

    from sd3tune.manifest import read_manifest

    entries = [e for e in read_manifest(Path(run_dir)).get("evaluations") or []
               if isinstance(e, dict) and e.get("lora_sha256") == lora_sha256]
    for entry in sorted(entries, key=lambda e: str(e.get("created", "")), reverse=True):
        try:
            metrics = Path(str(entry.get("metrics")))
            data = json.loads(metrics.read_text())
            models = data["models"]
            evaluation = {m["title"]: {k: m["metrics"][k]["mean"] for k in METRICS if k in m["metrics"]}
                          for m in models.values() if m["kind"] in ("base", "lora")}
            lora = next(m for m in models.values() if m["kind"] == "lora")
            samples = [(metrics.parent / row[0], data["prompts"][i]["text"]) for i, row in enumerate(lora["images"])
                       if row and data["prompts"][i].get("kind") != "neutral"]
        except (OSError, ValueError, KeyError, TypeError, IndexError, StopIteration):
            continue
        return evaluation, [(p, text) for p, text in samples if p.is_file()][:MAX_SAMPLES]
    return {}, []


def validation_samples(output_dir, prompt: str | None) -> list[tuple[Any, str]]:
    """SimpleTuner's newest validation images (``OUTPUT_DIR/validation_images``) with the run's validation prompt."""
    from pathlib import Path

    from sd3tune.simpletuner.layout import VALIDATION_IMAGES_DIR

    folder = Path(output_dir) / VALIDATION_IMAGES_DIR
    if not prompt or not folder.is_dir():
        return []
    pngs = sorted((p for p in folder.glob("*.png") if p.is_file()), key=lambda p: (p.stat().st_mtime, p.name))
    return [(p, prompt) for p in pngs[-MAX_SAMPLES:]]
