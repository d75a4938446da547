"""The prompts images are made for: a prompts file (`generate --prompts-file`, `evaluate --prompts`), and the prompts
`evaluate` chooses by default from the run (its validation prompt, training captions, trigger word) plus neutral
prompts, which show whether the LoRA's style leaks where no one asked for it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sd3tune.errors import Sd3tuneError

NEUTRAL_PREFIX = "neutral:"
NEUTRAL_PROMPTS = (
    "a photograph of a red apple on a wooden table",
    "a photo of a busy city street in daylight",
    "a portrait photograph of an elderly man",
)
CAPTION_PROMPTS = 3  # training captions used as concept prompts by default


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
