"""The paired statistics behind `sd3tune evaluate`'s verdicts, on fabricated metric arrays (no model, no image)."""

from __future__ import annotations

import numpy as np
import pytest

from sd3tune import stats
from sd3tune.evaluation import METRIC_ORDER, MetricsResult, ModelImages, compare

PROMPTS, SEEDS, DIM = 8, 4, 16


def _models(*labels: str) -> list[ModelImages]:
    kinds = {"base": "base", "lora": "lora"}
    return [ModelImages(label, "LoRA" if label == "lora" else label, kinds.get(label, "checkpoint"),  # type: ignore
                        int(label.split("-")[1]) if label.startswith("checkpoint-") else None, None, 1.0, [])
            for label in labels]


def _arrays(rng, shift: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """One model's paired values: per image [prompts, seeds] (neutral prompts: the last 3), diversity per prompt,
    KID features [concept prompts, seeds, d]; ``shift`` adds a constant to a metric."""
    shift = shift or {}
    feats = rng.normal(size=(PROMPTS - 3, SEEDS, DIM))
    out = {"clip_score": rng.normal(30, 3, size=(PROMPTS, SEEDS)),
           "style_similarity": rng.normal(0.8, 0.02, size=(PROMPTS - 3, SEEDS)),
           "neutral_style_similarity": rng.normal(0.5, 0.02, size=(3, SEEDS)),
           "drift": np.zeros((3, SEEDS)), "diversity": rng.normal(0.3, 0.01, size=PROMPTS),
           "kid": feats / np.linalg.norm(feats, axis=-1, keepdims=True)}
    return {k: v + shift.get(k, 0.0) for k, v in out.items()}


def _result(arrays: dict[str, dict[str, np.ndarray]], rng) -> MetricsResult:
    real = rng.normal(size=(20, DIM))
    return MetricsResult({}, [], {}, {"subset_size": 10}, [], arrays, real / np.linalg.norm(real, axis=1, keepdims=True))


def test_identical_candidates_differ_measurably_in_nothing_and_none_is_best():
    rng = np.random.default_rng(3)
    same = _arrays(rng)
    models = _models("base", "checkpoint-10", "lora")
    out = compare(models, _result({m.label: same for m in models}, rng))
    for label in ("checkpoint-10", "lora"):
        for metric in METRIC_ORDER:
            c = out["vs_base"][label][metric]
            assert c["verdict"] == stats.SAME and c["diff"] == 0.0, (label, metric, c)
            assert set(c) >= {"diff", "ci95", "verdict", "n"}
    assert out["best"]["label"] is None
    assert "best: none; no fine-tuned candidate is measurably ahead of all the others" in out["headline"]
    assert not any(" better (" in line or " worse (" in line for line in out["headline"])


def test_a_shift_of_three_standard_errors_is_better_and_a_third_of_one_is_not():
    rng = np.random.default_rng(0)
    n = 40
    base = rng.normal(30, 3, size=n)
    noise = rng.normal(0, 1, size=n)
    noise -= noise.mean()
    se = noise.std(ddof=1) / np.sqrt(n)
    up = stats.paired("clip_score", base, base + noise + 3 * se)
    assert up.verdict == stats.BETTER and up.diff == pytest.approx(3 * se) and up.ci95[0] > 0 and up.n == n
    assert up.se == pytest.approx(se, rel=0.15)  # the bootstrap's standard error is the textbook one
    assert stats.paired("kid", base, base + noise + 3 * se).verdict == stats.WORSE  # lower is better for KID
    small = stats.paired("clip_score", base, base + noise + se / 3)
    assert small.verdict == stats.SAME and small.ci95[0] < 0 < small.ci95[1]
    # the power estimate: a third of a standard error needs ~(2.8 * 3)^2 = 70x the samples
    assert small.more_needed == pytest.approx(n * 70, rel=0.2)
    assert "would need about" in "\n".join(stats.headline({"lora": "LoRA"}, {"lora": {"clip_score": small}}, None))


def test_the_bootstrap_is_the_same_for_a_seed_and_differs_for_another():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=30), rng.normal(0.2, 1, size=30)
    first, again = stats.paired("style_similarity", a, b), stats.paired("style_similarity", a, b)
    assert first.ci95 == again.ci95 and first.se == again.se
    other = stats.paired("style_similarity", a, b, seed=1)
    assert other.ci95 != first.ci95 and other.diff == first.diff
    feats = rng.normal(size=(3, 6, 4, DIM))
    real = rng.normal(size=(12, DIM))
    assert stats.kid_paired(feats[0], feats[1], real).ci95 == stats.kid_paired(feats[0], feats[1], real).ci95


def test_too_few_paired_values_give_no_verdict_even_when_all_agree():
    c = stats.paired("clip_score", [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 3.0, 4.0, 5.0, 6.0])
    assert c.ci95 == (1.0, 1.0) and c.verdict == stats.SAME and "6 needed" in c.why
    assert ", only 5 image pairs, 6 needed for a verdict)" in stats.describe(c)
    assert stats.paired("clip_score", [1.0] * 6, [2.0] * 6).verdict == stats.BETTER


def test_a_candidate_measurably_ahead_of_the_others_is_best_and_a_single_one_never_is():
    rng = np.random.default_rng(5)
    base = _arrays(rng)
    ahead = {**base, "style_similarity": base["style_similarity"] + 0.05 + rng.normal(0, 0.002, (PROMPTS - 3, SEEDS))}
    models = _models("base", "checkpoint-10", "lora")
    out = compare(models, _result({"base": base, "checkpoint-10": ahead, "lora": base}, rng))
    assert out["best"]["label"] == "checkpoint-10" and out["best"]["title"] == "checkpoint-10"
    assert out["vs_base"]["checkpoint-10"]["style_similarity"]["verdict"] == stats.BETTER
    assert out["headline"][0].startswith("checkpoint-10 vs base: CLIP score no measurable difference")
    assert "style similarity better (+0.05" in out["headline"][0]
    assert any(line.startswith("best: checkpoint-10 (") for line in out["headline"])
    single = compare(_models("base", "lora"), _result({"base": base, "lora": ahead}, rng))
    assert single["best"]["label"] is None and not any(line.startswith("best") for line in single["headline"])
    assert single["vs_base"]["lora"]["style_similarity"]["verdict"] == stats.BETTER


def test_kid_difference_is_torchmetrics_kid_difference_on_the_whole_sets():
    import torch
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(2)

    def unit(*shape):
        x = rng.normal(size=shape)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    real, a, b = unit(12, DIM), unit(4, 3, DIM), unit(4, 3, DIM) + 0.2

    def kid(fake):
        metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=1, subset_size=12, gamma=1.0)
        metric.update(torch.tensor(real, dtype=torch.float64), real=True)
        metric.update(torch.tensor(fake.reshape(12, DIM), dtype=torch.float64), real=False)
        return float(metric.compute()[0])

    c = stats.kid_paired(a, b, real)
    assert c.diff == pytest.approx(kid(b) - kid(a), rel=1e-6) and c.n == 4 and c.unit == "prompts"


def test_differences_show_enough_digits_to_tell_their_interval_from_zero():
    c = stats.Comparison("diversity", 0.00064, (0.00045, 0.00082), stats.BETTER, 7, "prompts")
    assert stats.shown(c) == ("+0.00064", "+0.00045..+0.00082")
    assert stats.describe(c) == "diversity better (+0.00064, CI +0.00045..+0.00082)"
    assert stats.signed(-1e-9, 3) == "0.000"


def test_the_method_says_what_its_intervals_hold_for_and_that_each_is_for_one_comparison():
    # the seeds of a prompt are the resampled unit of the per-image metrics: their intervals say nothing of other
    # prompts; and nothing corrects for the metrics x candidates judged together
    rng = np.random.default_rng(4)
    method = compare(_models("base", "lora"), _result({"base": _arrays(rng), "lora": _arrays(rng)}, rng))["method"]
    assert method == stats.METHOD  # what metrics.json, report.md and report.html show
    assert "per-image metrics: image pairs resampled, the seeds of a prompt as independent units, so their " \
           "intervals hold for these prompts only; diversity and KID: prompts resampled" in method
    assert "each interval is for one comparison, not corrected for the several metrics and candidates judged" \
           in method
    assert "95% percentile bootstrap" in method and "2000 resamples, seed 0" in method


@pytest.mark.parametrize("prompts, seeds, real_images", [(0, 4, 20), (1, 1, 20), (5, 4, 1)],
                         ids=["no-concept-prompt", "one-image", "one-training-image"])
def test_kid_of_fewer_than_two_images_on_a_side_is_not_measured_and_counts_nothing(prompts, seeds, real_images):
    # as evaluation._kid computes no KID then (subset size < 2): vs base says "not measured", n 0, and the headline
    # neither lists a KID sample size nor a KID verdict
    rng = np.random.default_rng(6)

    def arrays():
        feats = rng.normal(size=(prompts, seeds, DIM))
        return {**_arrays(rng), "kid": feats / np.maximum(np.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)}

    real = rng.normal(size=(real_images, DIM))
    result = MetricsResult({}, [], {}, {"subset_size": min(real_images, prompts * seeds)}, [],
                           {"base": arrays(), "lora": arrays()}, real / np.linalg.norm(real, axis=1, keepdims=True))
    out = compare(_models("base", "lora"), result)
    assert out["vs_base"]["lora"]["kid"] == {"metric": "kid", "diff": None, "ci95": None, "verdict": "not measured",
                                             "n": 0, "unit": "prompts", "se": None, "mde": None,
                                             "more_needed": None, "why": "not computed"}
    assert not any("KID" in line for line in out["headline"]), out["headline"]


def test_the_power_line_names_the_difference_nearest_to_being_resolved_the_first_of_equals():
    def unresolved(metric, more):
        return stats.Comparison(metric, 0.01, (-0.01, 0.03), stats.SAME, 8, "image pairs", 0.01, 0.028, more)

    comparisons = {"a": {"clip_score": unresolved("clip_score", 50),
                         "style_similarity": unresolved("style_similarity", 9)},
                   "b": {"clip_score": unresolved("clip_score", 9), "drift": unresolved("drift", 400)}}
    lines = stats.headline({"a": "A", "b": "B"}, comparisons, None)
    assert lines[-1] == ("power: A's style similarity difference of +0.010 would need about 9 more image pairs to be "
                         "resolved (80% power, 5% two-sided)")
