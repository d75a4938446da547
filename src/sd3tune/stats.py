"""Paired statistics for `sd3tune evaluate`: is a fine-tuned candidate measurably better than the base model?

Every candidate made its images on the same prompts x seeds as the base model, so each comparison is paired:

* per-image metrics (CLIP score, style similarity, drift): the differences candidate - base of each image pair, their
  mean, and a 95% percentile-bootstrap confidence interval of that mean (image pairs resampled: the seeds of one
  prompt count as independent units, so the interval holds for these prompts, not for prompts in general);
* set-level metrics (diversity, KID): diversity per prompt (its seeds' pairs), KID on all concept-prompt images;
  both bootstrapped over prompts (the same resampled prompts for base and candidate).

Each interval is for one comparison alone: nothing corrects for the several metrics x candidates judged at once, so
among many comparisons one may exclude 0 by chance.

The bootstrap is seeded (``BOOTSTRAP_SEED``): the same numbers give the same intervals. A verdict is ``better`` or
``worse`` only when the interval excludes 0, and only from ``MIN_PAIRS`` paired values up (fewer cannot show a
difference at 5%: even 5 differences of one sign have a two-sided sign-test p of 0.0625); otherwise it is ``no
measurable difference``. The power estimate says how many paired values a difference of the observed size would
need to be resolved (two-sided 5%, 80% power, the standard error scaled as 1/sqrt(n)).

numpy only (no torch): the unit tests run on fabricated arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

BOOTSTRAP_SEED = 0
RESAMPLES = 2000
LEVEL = 0.95
MIN_PAIRS = 6
Z_ALPHA, Z_POWER = 1.959964, 0.841621  # two-sided 5%; 80% power

BETTER, WORSE, SAME = "better", "worse", "no measurable difference"


@dataclass(frozen=True)
class Metric:
    name: str  # as sentences say it
    higher_is_better: bool
    digits: int
    unit: str  # what one paired value is


METRICS = {
    "clip_score": Metric("CLIP score", True, 2, "image pairs"),
    "style_similarity": Metric("style similarity", True, 3, "image pairs"),
    "diversity": Metric("diversity", True, 3, "prompts"),  # a drop is a collapse towards one image
    "kid": Metric("KID", False, 4, "prompts"),
    "neutral_style_similarity": Metric("neutral-prompt style similarity", False, 3, "image pairs"),
    "drift": Metric("neutral drift", False, 3, "image pairs"),  # the style leaking into neutral prompts
}
HEADLINE_METRICS = ("clip_score", "style_similarity", "diversity", "kid", "drift")  # neutral style = drift, paired
PRIMARY = ("clip_score", "style_similarity")  # what "best" among the fine-tuned candidates rests on

METHOD = (f"paired differences (candidate - base, same prompts and seeds); {LEVEL:.0%} percentile bootstrap of their "
          f"mean, {RESAMPLES} resamples, seed {BOOTSTRAP_SEED} (per-image metrics: image pairs resampled, the seeds "
          "of a prompt as independent units, so their intervals hold for these prompts only; diversity and KID: "
          "prompts resampled); each interval is for one comparison, not corrected for the several metrics and "
          f"candidates judged; better/worse only when the interval excludes 0 and rests on at least {MIN_PAIRS} "
          "paired values")
BEST_RULE = ("best = a fine-tuned candidate (never the base model) measurably ahead of every other fine-tuned "
             "candidate: against each, better on CLIP score or style similarity (paired 95% bootstrap interval of "
             "the difference above 0) and worse on neither; none with a single candidate or when none is ahead of "
             "all others")


@dataclass
class Comparison:
    """One metric of one candidate against a reference (the base model, or another candidate)."""

    metric: str
    diff: float | None  # mean paired difference, candidate - reference
    ci95: tuple[float, float] | None
    verdict: str
    n: int  # paired values (image pairs or prompts)
    unit: str
    se: float | None = None  # bootstrap standard error of ``diff``
    mde: float | None = None  # smallest difference resolvable at this n (80% power)
    more_needed: int | None = None  # more paired values to resolve ``diff`` (no measurable difference only)
    why: str | None = None  # why there is no verdict

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ci95"] = list(self.ci95) if self.ci95 is not None else None
        return out


def resample_counts(n: int, seed: int = BOOTSTRAP_SEED, resamples: int = RESAMPLES):
    """[resamples, n]: how often each of n units is drawn in each bootstrap resample (drawn with replacement)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    counts = np.zeros((resamples, n))
    np.add.at(counts, (np.arange(resamples)[:, None], idx), 1.0)
    return counts


def judge(metric: str, diff: float | None, boot: Sequence[float] | None, n: int, why: str | None = None) -> Comparison:
    """The comparison from a point estimate and its bootstrap distribution: interval, verdict and power."""
    import numpy as np

    spec = METRICS[metric]
    if diff is None or boot is None or not math.isfinite(diff) or n < 2:
        return Comparison(metric, diff, None, SAME if diff is not None else "not measured", n, spec.unit,
                          why=why or "fewer than 2 paired values")
    values = np.asarray(boot, dtype=float)
    lo, hi = (float(v) for v in np.quantile(values, [(1 - LEVEL) / 2, (1 + LEVEL) / 2]))
    se = float(values.std(ddof=1))
    verdict = SAME
    if n < MIN_PAIRS:
        why = why or f"only {n} {spec.unit}, {MIN_PAIRS} needed for a verdict"
    elif lo > 0 or hi < 0:
        verdict = BETTER if (lo > 0) == spec.higher_is_better else WORSE
    mde = (Z_ALPHA + Z_POWER) * se
    more = None
    if verdict == SAME and abs(diff) > 1e-12 and se > 0:
        needed = max(math.ceil(n * (mde / abs(diff)) ** 2), MIN_PAIRS)
        more = needed - n if needed > n else None
    return Comparison(metric, float(diff), (lo, hi), verdict, n, spec.unit, se, mde, more, why)


def paired(metric: str, reference: Sequence[float], candidate: Sequence[float],
           seed: int = BOOTSTRAP_SEED) -> Comparison:
    """Mean of the paired differences candidate - reference with its bootstrap interval (units resampled)."""
    import numpy as np

    diffs = np.asarray(candidate, dtype=float).ravel() - np.asarray(reference, dtype=float).ravel()
    diffs = diffs[np.isfinite(diffs)]
    if len(diffs) == 0:
        return judge(metric, None, None, 0, "not computed")
    if len(diffs) < 2:
        return judge(metric, float(diffs.mean()), None, len(diffs))
    boot = resample_counts(len(diffs), seed) @ diffs / len(diffs)
    return judge(metric, float(diffs.mean()), boot, len(diffs))


def kid_paired(reference, candidate, real, seed: int = BOOTSTRAP_SEED, degree: int = 3, gamma: float = 1.0,
               coef: float = 1.0) -> Comparison:
    """KID (unbiased MMD^2, polynomial kernel as torchmetrics') of ``candidate`` minus that of ``reference``, both
    against ``real``: features [prompts, seeds, d] (L2-normalised) and [N, d]. Bootstrapped over prompts: a resample
    draws prompts with replacement and takes all their images, for both models. The training images' own term is
    the same for both models and cancels."""
    import numpy as np

    ref, cand, real = (np.asarray(a, dtype=np.float64) for a in (reference, candidate, real))
    prompts, seeds = ref.shape[:2]
    if prompts * seeds < 2 or len(real) < 2:  # as evaluation._kid: no KID of fewer than 2 images on either side
        return judge("kid", None, None, 0, "not computed")

    def parts(x):  # per-prompt block sums of the kernel: fake x fake [P, P], its diagonal [P], fake x real [P]
        flat = x.reshape(prompts * seeds, -1)
        k = (gamma * flat @ flat.T + coef) ** degree
        blocks = k.reshape(prompts, seeds, prompts, seeds).sum(axis=(1, 3))
        diag = np.diag(k).reshape(prompts, seeds).sum(1)
        cross = ((gamma * flat @ real.T + coef) ** degree).mean(1).reshape(prompts, seeds).sum(1)
        return blocks, diag, cross

    def kid_of(counts, blocks, diag, cross):  # counts [R, P] -> the KID terms that depend on the fake images [R]
        m = counts.sum(1) * seeds
        pairs = np.einsum("rp,pq,rq->r", counts, blocks, counts) - counts @ diag
        return pairs / (m * (m - 1)) - 2 * (counts @ cross) / m

    a, b = parts(ref), parts(cand)
    whole = np.ones((1, prompts))
    diff = float(kid_of(whole, *b)[0] - kid_of(whole, *a)[0])
    if prompts < 2:
        return judge("kid", diff, None, prompts, "one concept prompt: nothing to resample")
    counts = resample_counts(prompts, seed)
    return judge("kid", diff, kid_of(counts, *b) - kid_of(counts, *a), prompts)


# ----------------------------------------------------------------------------------------------- the verdicts


def best_candidate(candidates: Sequence[str], versus: Callable[[str, str, str], Comparison]) -> str | None:
    """BEST_RULE: the candidate measurably ahead of every other one; ``versus(a, b, metric)`` compares a with b."""
    if len(candidates) < 2:
        return None
    for a in candidates:
        ahead = True
        for b in candidates:
            if a == b:
                continue
            verdicts = {versus(a, b, m).verdict for m in PRIMARY}
            if WORSE in verdicts or BETTER not in verdicts:
                ahead = False
                break
        if ahead:
            return a
    return None


def signed(value: float | None, digits: int) -> str:
    """``+0.041`` / ``-0.08``; a value that rounds to 0 shows as 0 with no sign."""
    if value is None:
        return "n/a"
    text = f"{value:+.{digits}f}"
    return text[1:] if float(text) == 0 else text


def decimals(metric: str, ci95: Sequence[float] | None) -> int:
    """Decimals to show a difference and its interval with: the metric's own, more when the interval is narrower
    than they can show (2 significant digits of its width; at most 6)."""
    digits = METRICS[metric].digits
    if ci95 and ci95[1] - ci95[0] > 0:
        digits = max(digits, 1 - math.floor(math.log10(ci95[1] - ci95[0])))
    return min(digits, 6)


def shown(c: Comparison | dict[str, Any]) -> tuple[str, str | None]:
    """A comparison's difference and interval as text: ``+0.041`` and ``+0.020..+0.060`` (None without one)."""
    get = c.get if isinstance(c, dict) else lambda k: getattr(c, k)
    ci = get("ci95")
    d = decimals(get("metric"), ci)
    return signed(get("diff"), d), (f"{signed(ci[0], d)}..{signed(ci[1], d)}" if ci else None)


def describe(c: Comparison) -> str:
    """``style similarity better (+0.041, CI +0.020..+0.060)``, and why there is no verdict when the interval alone
    would give one."""
    spec = METRICS[c.metric]
    if c.diff is None:
        return f"{spec.name} not measured"
    diff, ci = shown(c)
    why = f", {c.why}" if c.why and c.ci95 and (c.ci95[0] > 0 or c.ci95[1] < 0) else ""
    return f"{spec.name} {c.verdict} ({diff}, " + (f"CI {ci}" if ci else "no CI") + f"{why})"


def headline(titles: dict[str, str], vs_base: dict[str, dict[str, Comparison]], best: str | None) -> list[str]:
    """What the numbers support, in words: one line per candidate, the best (if any), the sample size and what
    would resolve the differences the interval cannot yet tell from 0."""
    lines = []
    for label, comparisons in vs_base.items():
        said = [describe(comparisons[m]) for m in HEADLINE_METRICS if m in comparisons
                and comparisons[m].diff is not None]
        lines.append(f"{titles[label]} vs base: " + ("; ".join(said) if said else "nothing measured"))
    if len(vs_base) > 1:
        lines.append(f"best: {titles[best]} (measurably ahead of the other fine-tuned candidates on CLIP score or "
                     "style similarity, behind on neither; how it compares with the base model is its line above)"
                     if best else
                     "best: none; no fine-tuned candidate is measurably ahead of all the others")
    first = next(iter(vs_base.values()), {})
    sizes = [(METRICS[m].name, c.n, c.unit) for m, c in first.items() if m in HEADLINE_METRICS and c.n]
    if sizes:
        lines.append("n per candidate: " + "; ".join(f"{name} {n} {unit}" for name, n, unit in sizes))
    unresolved = [(titles[label], c) for label, comparisons in vs_base.items() for m, c in comparisons.items()
                  if m in HEADLINE_METRICS and c.more_needed]
    if unresolved:
        title, c = min(unresolved, key=lambda tc: tc[1].more_needed)  # the nearest to being resolved
        lines.append(f"power: {title}'s {METRICS[c.metric].name} difference of "
                     f"{signed(c.diff, METRICS[c.metric].digits)} would need about {c.more_needed} more {c.unit} "
                     "to be resolved (80% power, 5% two-sided)")
    return lines
