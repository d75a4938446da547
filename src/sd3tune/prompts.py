"""The prompts images are made for: a prompts file (`generate --prompts-file`, `evaluate --prompts`), and the prompts
`evaluate` chooses by default from the run (its validation prompt, training captions, trigger word) plus neutral
prompts, which show whether the LoRA's style leaks where no one asked for it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sd3tune.errors import Sd3tuneError
from sd3tune.findings import plural

NEUTRAL_PREFIX = "neutral:"
NEUTRAL_PROMPTS = (
    "a photograph of a red apple on a wooden table",
    "a photo of a busy city street in daylight",
    "a portrait photograph of an elderly man",
)
CAPTION_PROMPTS = 3  # training captions used as concept prompts by default
CAPTION_WORDS = 30  # a caption chosen as a prompt is cut to its first words (captions can run to hundreds)


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


def shorten(text: str, trigger: str | None, words: int = CAPTION_WORDS) -> str:
    """The first ``words`` words of ``text``; the trigger word first when the cut lost it."""
    kept = text.split()
    if len(kept) <= words:
        return " ".join(kept)
    short = " ".join(kept[:words])
    if trigger and trigger.lower() in text.lower() and trigger.lower() not in short.lower():
        short = f"{trigger}, {short}"
    return short


def default_prompts(validation_prompt: str | None, captions: Sequence[str], trigger: str | None,
                    n_captions: int = CAPTION_PROMPTS, notes: list[str] | None = None) -> list[EvalPrompt]:
    """The run's validation prompt and a few of its training captions (concept prompts; each cut to its first
    CAPTION_WORDS words, said in ``notes``), plus neutral prompts."""
    concept: list[str] = [validation_prompt] if validation_prompt else []
    cut: dict[str, bool] = {}  # each caption as a prompt -> whether it was cut
    for c in captions:
        if c and c.strip():
            cut.setdefault(shorten(c, trigger), len(c.split()) > CAPTION_WORDS)
    distinct = [c for c in cut if c not in concept]
    if distinct and n_captions > 0:
        step = len(distinct) / min(n_captions, len(distinct))
        chosen = [distinct[int(i * step)] for i in range(min(n_captions, len(distinct)))]
        concept += chosen
        if notes is not None and any(cut[c] for c in chosen):
            notes.append(f"{plural(sum(cut[c] for c in chosen), 'concept prompt')} from training captions cut to "
                         f"the first {CAPTION_WORDS} words (the full captions are longer)")
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
