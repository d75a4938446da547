"""`sd3tune evaluate` on the SimpleTuner-trained tiny run, scored with a tiny random CLIP built offline.

Real components throughout: diffusers generates, torchmetrics computes KID, transformers runs the CLIP model that is
loaded from a folder exactly as a Hub CLIP would be. Sizes are tiny: 64 px, 4 steps, 2 prompts x 2 seeds.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sd3tune.cli import app
from sd3tune.commands.evaluate import EvaluateOptions, run_evaluate
from sd3tune.errors import Sd3tuneError
from sd3tune.evaluation import METRIC_ORDER
from sd3tune.prompts import read_prompts_file
from sd3tune.report import format_table

STEPS = 4
SEEDS = 2


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    from sd3tune.tiny import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("# one concept prompt (has the trigger) and one neutral prompt (has not)\n"
                    "sd3tune-style, concept art of a castle\n"
                    "a photo of a red apple on a table\n", encoding="utf-8")
    return path


def _opts(run_dir: Path, clip: Path, prompts: Path, out: Path, **kw) -> EvaluateOptions:
    return EvaluateOptions(run_dir=run_dir, prompts_file=prompts, seeds=SEEDS, steps=STEPS, clip_model=str(clip),
                           out=out, device="cpu", **kw)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, trained_run, tiny_clip, prompts_file):
    """One evaluation of base, LoRA and checkpoint-10 from one pipeline load (checkpoint-20 holds the final LoRA's
    weights: evaluated once, as the LoRA)."""
    out = tmp_path_factory.mktemp("eval") / "all"
    return run_evaluate(_opts(trained_run, tiny_clip, prompts_file, out, checkpoints="all"), progress=False)


def _means(result, label: str) -> dict[str, float]:
    return {k: result.metrics["models"][label]["metrics"][k]["mean"] for k in METRIC_ORDER}


@pytest.mark.e2e
def test_evaluate_writes_finite_metrics_a_grid_and_a_report(evaluated, trained_run, tiny_clip):
    from PIL import Image

    data = json.loads(evaluated.metrics_file.read_text())
    assert data == json.loads(json.dumps(evaluated.metrics))  # the file is what the API returned
    # checkpoint-20 is the final LoRA (other metadata, same tensors): not generated and scored a second time
    final, last = (trained_run / "output" / "pytorch_lora_weights.safetensors",
                   trained_run / "output" / "checkpoint-20" / "pytorch_lora_weights.safetensors")
    assert last.is_file() and final.read_bytes() != last.read_bytes()
    assert list(data["models"]) == ["base", "checkpoint-10", "lora"]  # in training-step order, the final LoRA last
    assert [m["step"] for m in data["models"].values()] == [None, 10, 20]
    assert "checkpoint-20 is the final LoRA (identical weights): evaluated once" in data["notes"]
    assert not (evaluated.out / "images" / "checkpoint-20").exists()
    for label in ("base", "lora"):
        for metric in METRIC_ORDER:
            stat = data["models"][label]["metrics"][metric]
            assert isinstance(stat["mean"], float) and math.isfinite(stat["mean"]), (label, metric, stat)
            assert math.isfinite(stat["std"]) and stat["n"] >= 1
    assert data["models"]["base"]["metrics"]["drift"]["mean"] == 0.0  # drift is measured against the base
    assert data["models"]["lora"]["metrics"]["clip_score"]["n"] == 2 * SEEDS
    assert data["models"]["lora"]["metrics"]["style_similarity"]["n"] == SEEDS  # concept prompt only
    assert data["models"]["lora"]["metrics"]["diversity"]["n"] == 2  # one seed pair per prompt
    # provenance
    assert data["sd3tune_version"] and data["seeds"] == [0, 1] and data["sampler"]["steps"] == STEPS
    assert data["lora"]["file"].endswith("output/pytorch_lora_weights.safetensors")
    assert data["clip_model"]["name"] == str(tiny_clip.resolve()) and data["clip_model"]["source"] == "local folder"
    assert [p["kind"] for p in data["prompts"]] == ["concept", "neutral"]
    assert data["training_images"]["used"] == 8
    assert data["kid"]["subset_size"] == SEEDS and "CLIP" in data["kid"]["feature"]
    # each candidate against the base: paired differences with intervals and verdicts, never a claim they do not back
    _assert_honest(data)
    assert data["best"]["label"] in (None, "lora", "checkpoint-10")
    assert "measurably ahead of every other fine-tuned candidate" in data["best"]["rule"]
    # the grid: rows prompts, columns base | LoRA | checkpoints
    sheet = Image.open(evaluated.sheet)
    assert sheet.size == (220 + 3 * (128 + 4) + 4, 22 + 2 * (128 + 4) + 4)
    # the sheet's own provenance: what made it, its rows (prompts at seed 0) and columns (models and their LoRAs)
    text = sheet.text
    made = json.loads(text["sd3tune"])
    assert made["sd3tune_version"] == text["sd3tune:sd3tune_version"] == data["sd3tune_version"]
    assert made["model"] == text["sd3tune:model"] == data["model"]
    assert made["lora"] == text["sd3tune:lora"] == data["lora"]["file"]
    assert made["lora_sha256"] == text["sd3tune:lora_sha256"] == data["lora"]["sha256"]
    assert (made["steps"], made["width"], made["device"]) == (data["sampler"]["steps"], data["sampler"]["width"],
                                                              data["device"])
    assert "prompt" not in made and "seed" not in made and "lora_adapter_weight" not in made  # per cell / column
    assert made["prompts"] == json.loads(text["sd3tune:prompts"]) == [p["text"] for p in data["prompts"]]
    assert made["seeds"] == [0] and (made["rows"], made["columns"]) == ("prompt", "model")
    assert made["column_labels"] == ["base", "checkpoint-10", "LoRA"]
    assert [(m["label"], m["lora_sha256"]) for m in made["models"]] == [
        (label, m["lora_sha256"]) for label, m in data["models"].items()]
    assert made["images"][1] == [m["images"][1][0] for m in data["models"].values()]
    report = evaluated.report.read_text()
    assert "| model | step | CLIP score" in report and "](contact_sheet.png)" in report
    assert data["best"]["rule"] in report and "Inception" in report
    import re

    unescaped = re.sub(r"\\(.)", r"\1", report)  # as Markdown shows it
    assert all(f"- **{line}**" in unescaped for line in data["headline"])  # what the numbers support, first
    assert "| candidate | CLIP score | style similarity |" in report and "## How the run trained" in report
    page = evaluated.report_html.read_text()
    assert "<table class=\"cmp\">" in page and "<svg" in page and "<script" not in page
    # the method, as every report says it: what its intervals hold for, and that each is for one comparison
    method = data["statistics"]["method"]
    assert "so their intervals hold for these prompts only" in method and "not corrected for the several" in method
    assert f"Method: {method}." in report and f'<p class="sub">{html.escape(method)}.</p>' in page
    # KID's definition says its difference against the base is another estimate than the tables' subset means
    assert f"- **kid**: {data['definitions']['kid']}" in report and html.escape(data["definitions"]["kid"]) in page
    assert "so it can differ from the difference of the two subset means" in data["definitions"]["kid"]
    # the training side: every step's loss from SimpleTuner's log of the training, as the manifest recorded it
    training = data["training"]
    assert training["loss"]["steps"] == list(range(1, 21))
    manifest_training = json.loads((trained_run / "sd3tune.json").read_text())["trainings"][0]
    assert training["loss"]["values"][-1] == manifest_training["final_loss"]
    assert training["lr"]["values"] and training["settings"]["learning rate"] == training["lr"]["values"][0]
    assert training["validation_images"] == {"step": None, "files": [],
                                             "from": str(trained_run / "output" / "validation_images")}
    # every image is on disk with its provenance
    first = evaluated.out / data["models"]["checkpoint-10"]["images"][0][0]
    fields = json.loads(Image.open(first).text["sd3tune"])
    assert fields["evaluate_model"] == "checkpoint-10" and fields["lora"].endswith(
        "checkpoint-10/pytorch_lora_weights.safetensors") and fields["seed"] == 0
    # which exact weights: a retrain replaces the file at the same path
    checkpoint = trained_run / "output" / "checkpoint-10" / "pytorch_lora_weights.safetensors"
    assert fields["lora_sha256"] == data["models"]["checkpoint-10"]["lora_sha256"] == hashlib.sha256(
        checkpoint.read_bytes()).hexdigest()
    assert data["lora"]["sha256"] == data["models"]["lora"]["lora_sha256"] == hashlib.sha256(
        final.read_bytes()).hexdigest() != fields["lora_sha256"]
    assert data["models"]["base"]["lora_sha256"] is None
    base_text = Image.open(evaluated.out / data["models"]["base"]["images"][0][0]).text
    assert json.loads(base_text["sd3tune"])["lora"] is None and "sd3tune:lora" not in base_text  # null: no chunk
    assert f"(sha256 `{data['lora']['sha256'][:12]}`)" in report
    # the run remembers its evaluations
    manifest = json.loads((trained_run / "sd3tune.json").read_text())
    assert [(e["models"], e["lora_sha256"]) for e in manifest["evaluations"] if e["out"] == str(evaluated.out)] == [
        (list(data["models"]), data["lora"]["sha256"])]
    assert "LoRA" in format_table(data) and ("*" in format_table(data)) == (data["best"]["label"] is not None)


def _assert_honest(data: dict) -> None:
    """metrics.json carries, per candidate and metric, diff, ci95, verdict and n; a verdict is "better" or "worse"
    only when its interval excludes 0, and the headline says only those verdicts."""
    from sd3tune.stats import BETTER, HEADLINE_METRICS, METRICS, SAME, WORSE, describe, Comparison

    for label, model in data["models"].items():
        if model["kind"] == "base":
            assert model["vs_base"] is None
            continue
        line = next(x for x in data["headline"] if x.startswith(f"{model['title']} vs base: "))
        for metric in METRIC_ORDER:
            c = model["vs_base"][metric]
            assert {"diff", "ci95", "verdict", "n"} <= set(c), (label, metric)
            if c["verdict"] in (BETTER, WORSE):
                lo, hi = c["ci95"]
                assert (lo > 0 or hi < 0) and c["n"] >= 6
                assert (c["verdict"] == BETTER) == ((lo > 0) == METRICS[metric].higher_is_better)
            elif c["diff"] is not None:
                assert c["verdict"] == SAME
            if metric in HEADLINE_METRICS and c["diff"] is not None:
                assert describe(Comparison(**{**c, "ci95": tuple(c["ci95"]) if c["ci95"] else None})) in line
        assert " better (" not in line or any(c["verdict"] == BETTER for c in model["vs_base"].values())


@pytest.mark.e2e
def test_metrics_respond_to_the_lora(evaluated, trained_run, tiny_clip, prompts_file, tmp_path):
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file, save_file

    base, lora = _means(evaluated, "base"), _means(evaluated, "lora")
    assert base != lora  # the trained LoRA already moves the numbers

    tensors = load_file(str(trained_run / "output" / "pytorch_lora_weights.safetensors"))
    boosted = {k: v * 10 if "lora_B" in k else v for k, v in tensors.items()}
    assert any("lora_B" in k for k in tensors)
    file = tmp_path / "boosted" / "lora_x10.safetensors"
    file.parent.mkdir()
    save_file(boosted, str(file))
    other = run_evaluate(_opts(trained_run, tiny_clip, prompts_file, tmp_path / "out", lora=file), progress=False)

    assert list(other.metrics["models"]) == ["base", "lora"]
    # the base column does not depend on which LoRA (or how many adapters) the pipeline holds: deterministic
    assert _means(other, "base") == pytest.approx(base, abs=1e-5)
    changed = _means(other, "lora")
    for metric in ("style_similarity", "kid", "neutral_style_similarity", "drift"):  # continuous, never clipped
        assert changed[metric] != pytest.approx(lora[metric], abs=1e-6), metric
    per_image = [(r["clip_score"], r["style_similarity"]) for r in other.metrics["per_image"] if r["model"] == "lora"]
    assert per_image != [(r["clip_score"], r["style_similarity"]) for r in evaluated.metrics["per_image"]
                         if r["model"] == "lora"]
    a = np.asarray(Image.open(evaluated.out / "images" / "lora" / "00-s0.png"), np.float32)
    b = np.asarray(Image.open(tmp_path / "out" / "images" / "lora" / "00-s0.png"), np.float32)
    assert np.abs(a - b).mean() > 1.0


@pytest.mark.e2e
def test_clip_score_matches_torchmetrics(evaluated, tiny_clip):
    """Our per-image CLIP score is torchmetrics' CLIPScore formula (run here through torchmetrics itself)."""
    import numpy as np
    import torch
    from PIL import Image
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    class Unwrapped(torch.nn.Module):  # torchmetrics 1.9 expects tensors, transformers 5 returns output objects
        def __init__(self, model) -> None:
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, pixel_values):
            return self.model.get_image_features(pixel_values=pixel_values).pooler_output

        def get_text_features(self, input_ids, attention_mask):
            return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    data = evaluated.metrics
    checked = 0
    for record in data["per_image"]:
        if record["model"] not in ("base", "lora"):
            continue
        path = evaluated.out / data["models"][record["model"]]["images"][record["prompt_index"]][
            data["seeds"].index(record["seed"])]
        image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        metric = CLIPScore(model_name_or_path=lambda: (Unwrapped(model), processor))
        with torch.inference_mode():
            expected = float(metric(image, data["prompts"][record["prompt_index"]]["text"]))
        assert record["clip_score"] == pytest.approx(max(expected, 0.0), abs=1e-3)
        checked += 1
    assert checked == 2 * 2 * SEEDS


@pytest.mark.e2e
def test_cli_command_prints_the_table_and_paths(trained_run, tiny_clip, tmp_path):
    out = tmp_path / "cli"
    # no --prompts: the run's validation prompt and 3 training captions, plus the 3 built-in neutral prompts
    result = CliRunner().invoke(app, ["evaluate", str(trained_run), "--seeds", "2", "--steps", str(STEPS),
                                      "--clip-model", str(tiny_clip), "--out", str(out), "--device", "cpu",
                                      "--checkpoints", "latest"])
    assert result.exit_code == 0, result.output
    assert f"metrics: {out / 'metrics.json'}" in result.output
    assert "contact_sheet.png" in result.output and "report.md" in result.output
    assert "CLIP score" in result.output and "base" in result.output and "\nLoRA vs base: CLIP score " in result.output
    data = json.loads((out / "metrics.json").read_text())
    # one candidate: nothing to be "best" among (it used to be best by default, whatever its numbers)
    assert list(data["models"]) == ["base", "lora"] and data["best"]["label"] is None and "best" not in result.output
    assert data["headline"][-1].startswith(("n per candidate: ", "power: "))
    _assert_honest(data)
    clip = data["models"]["lora"]["vs_base"]["clip_score"]
    assert clip["n"] == 7 * 2 and clip["unit"] == "image pairs"  # 7 prompts x 2 seeds, paired with the base's
    assert data["models"]["lora"]["vs_base"]["kid"]["unit"] == "prompts"
    kinds = [p["kind"] for p in data["prompts"]]
    assert kinds == ["concept"] * 4 + ["neutral"] * 3
    assert all("sd3tune-style" in p["text"] for p in data["prompts"][:4])
    assert all(math.isfinite(data["models"]["lora"]["metrics"][k]["mean"]) for k in METRIC_ORDER)


@pytest.mark.e2e
def test_an_earlier_evaluation_is_refused_and_replaced_only_with_force(evaluated, trained_run, tiny_clip,
                                                                       prompts_file, tmp_path):
    import shutil

    from sd3tune.manifest import read_manifest, update_manifest

    out = tmp_path / "eval"
    shutil.copytree(evaluated.out, out)  # an earlier evaluation (--checkpoints all, 2 seeds) in this folder ...
    entry = next(e for e in read_manifest(trained_run)["evaluations"] if e["out"] == str(evaluated.out))
    update_manifest(trained_run, "evaluations", {**entry, "out": str(out), "metrics": str(out / "metrics.json")},
                    append=True)  # ... as the run recorded it
    (out / "mine.txt").write_text("not evaluate's")
    earlier = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args = ["evaluate", str(trained_run), "--prompts", str(prompts_file), "--seeds", "1", "--steps", str(STEPS),
            "--clip-model", str(tiny_clip), "--out", str(out), "--device", "cpu", "--checkpoints", "latest"]

    refused = CliRunner().invoke(app, args)
    assert isinstance(refused.exception, Sd3tuneError), refused.output  # `sd3tune` prints it as one line, exit 2
    err = refused.exception
    assert err.exit_code == 2
    assert f"--out {out} already holds an evaluation" in err.message and "\n" not in err.one_line()
    assert "another --out" in err.hint and "--force" in err.hint
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == earlier  # nothing touched

    result = CliRunner().invoke(app, args + ["--force"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "metrics.json").read_text())
    assert data["seeds"] == [0] and list(data["models"]) == ["base", "lora"]
    # no image of the earlier evaluation is left beside the new ones (its checkpoint-10 column, its seed 1)
    assert sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*") if p.is_file()) == [
        "images/base/00-s0.png", "images/base/01-s0.png", "images/lora/00-s0.png", "images/lora/01-s0.png"]
    assert (out / "mine.txt").read_text() == "not evaluate's"  # only what evaluate writes is replaced
    entries = [e for e in read_manifest(trained_run)["evaluations"] if e["out"] == str(out)]
    assert len(entries) == 1 and entries[0]["models"] == ["base", "lora"]  # replaced, not a second entry


def test_an_out_folder_with_files_is_refused_before_any_model_loads(trained_run, prompts_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    opts = EvaluateOptions(run_dir=trained_run, prompts_file=prompts_file, seeds=SEEDS, steps=STEPS,
                           clip_model=str(tmp_path / "no-clip-here"), out=out, device="cpu")
    with pytest.raises(Sd3tuneError) as info:  # refused first: the missing CLIP is not even looked at
        run_evaluate(opts, progress=False)
    assert f"--out {out} already holds files" in info.value.message and "--force" in info.value.hint
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


# ----------------------------------------------------------------------------------------------- user errors


@pytest.fixture()
def untrained_run(tiny_init_options) -> Path:
    from sd3tune.commands.init import run_init

    run_init(tiny_init_options)
    return tiny_init_options.run_dir


@pytest.mark.parametrize("case", ["missing_run", "no_lora"])
def test_user_errors_are_one_line_with_a_hint(case, request, tmp_path, prompts_file):
    _assert_user_error(case, request, tmp_path, prompts_file)


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["inside_run", "bad_checkpoints", "missing_clip", "clip_not_a_model",
                                  "clip_text_encoder", "clip_not_on_hub", "missing_prompts", "zero_seeds"])
def test_user_errors_about_a_trained_run_are_one_line_with_a_hint(case, request, trained_run, tmp_path, prompts_file):
    # trained_run named here, not only asked for below: its tests then run where it was trained (one xdist group)
    _assert_user_error(case, request, tmp_path, prompts_file)


def _assert_user_error(case, request, tmp_path, prompts_file) -> None:
    run = tmp_path / "nope"
    kw: dict = {}
    clip = tmp_path / "no-clip-here"
    if case in ("bad_checkpoints", "missing_clip", "clip_not_a_model", "clip_text_encoder", "clip_not_on_hub",
                "missing_prompts", "zero_seeds"):
        run = request.getfixturevalue("trained_run")
    if case == "no_lora":
        run = request.getfixturevalue("untrained_run")
    if case == "inside_run":  # the run's output folder instead of the run
        run = request.getfixturevalue("trained_run") / "output"
    if case in ("no_lora", "missing_run", "inside_run", "missing_prompts", "zero_seeds", "bad_checkpoints"):
        clip = request.getfixturevalue("tiny_clip")
    if case == "bad_checkpoints":
        kw["checkpoints"] = "best"
    if case == "clip_not_a_model":
        clip = tmp_path / "empty"
        clip.mkdir()
    if case == "clip_text_encoder":  # the text half of CLIP only (as in every SD3 model folder)
        clip = request.getfixturevalue("tiny_model") / "text_encoder"
    if case == "clip_not_on_hub":
        clip = "sd3tune-tests/no-such-clip"  # the tests are offline (HF_HUB_OFFLINE=1): a Hub id cannot load
    if case == "zero_seeds":
        kw["seeds"] = 0
    prompts = tmp_path / "missing.txt" if case == "missing_prompts" else prompts_file
    opts = EvaluateOptions(run_dir=run, prompts_file=prompts, clip_model=str(clip), out=tmp_path / "out", steps=STEPS,
                           device="cpu", **{"seeds": SEEDS, **kw})
    with pytest.raises(Sd3tuneError) as info:
        run_evaluate(opts, progress=False)
    err = info.value
    assert err.exit_code == 2 and err.hint and "\n" not in err.one_line()
    expected = {"missing_run": "does not exist", "inside_run": "is inside the run folder", "no_lora": "no pytorch_lora_weights", "bad_checkpoints": "'best'",
                "missing_clip": "--clip-model", "clip_not_a_model": "no config.json",
                "clip_text_encoder": "is not a full CLIP model (vision + text)",
                "clip_not_on_hub": "cannot load CLIP model sd3tune-tests/no-such-clip",
                "missing_prompts": "prompts file", "zero_seeds": "--seeds 0"}[case]
    assert expected in err.message
    if case == "no_lora":  # evaluate has no option for a .safetensors file: the fix is to train
        assert "sd3tune train" in err.hint and "safetensors" not in err.hint
    assert not (tmp_path / "out").exists()  # nothing written, no model loaded


def test_a_missing_clip_recorded_in_the_run_says_where_it_came_from(trained_run, prompts_file, tmp_path):
    import shutil

    from sd3tune.manifest import update_manifest

    run = tmp_path / "run"  # the trained run (its config names its output folder) with a CLIP that was moved away
    shutil.copytree(trained_run / "config", run / "config")
    shutil.copy(trained_run / "sd3tune.json", run / "sd3tune.json")
    update_manifest(run, "defaults", {"clip_model": str(tmp_path / "moved-clip")})
    opts = EvaluateOptions(run_dir=run, prompts_file=prompts_file, seeds=SEEDS, steps=STEPS, out=tmp_path / "out",
                           device="cpu")  # no --clip-model
    with pytest.raises(Sd3tuneError) as info:
        run_evaluate(opts, progress=False)
    err = info.value
    assert f"CLIP model {tmp_path / 'moved-clip'} (from defaults.clip_model in {run / 'sd3tune.json'}) does not " \
           "exist" in err.message and "--clip-model" not in err.message
    assert "pass --clip-model" in err.hint and "\n" not in err.one_line()


def test_a_clip_folder_that_fails_to_load_as_a_full_clip_is_one_line(tiny_clip, monkeypatch):
    """transformers raises RuntimeError for weights that do not fit CLIPModel (e.g. a text encoder whose config does
    not say so): a one-line error, not a traceback."""
    from transformers import CLIPModel

    from sd3tune.clip import ClipModel

    def mismatched(*args, **kwargs):
        raise RuntimeError("You set `ignore_mismatched_sizes` to `False`, thus raising an error.\nsize mismatch ...")

    monkeypatch.setattr(CLIPModel, "from_pretrained", mismatched)
    with pytest.raises(Sd3tuneError) as info:
        ClipModel.load(str(tiny_clip))
    assert "cannot be loaded as a full CLIP model (vision + text)" in info.value.message
    assert "CLIPModel" in info.value.hint and "\n" not in info.value.one_line()


def test_cli_user_error_is_an_sd3tune_error_with_exit_code_2(tmp_path, tiny_clip):
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "missing-run"), "--checkpoints", "every",
                                      "--clip-model", str(tiny_clip)])
    assert isinstance(result.exception, Sd3tuneError)
    assert result.exception.exit_code == 2 and "--checkpoints 'every'" in result.exception.one_line()


def test_prompt_files_mark_neutral_prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# comment\nmyst, a lighthouse\na plain chair\nneutral: myst-free street\n\n", encoding="utf-8")
    kinds = [(p.text, p.kind) for p in read_prompts_file(path, trigger="myst")]
    assert kinds == [("myst, a lighthouse", "concept"), ("a plain chair", "neutral"), ("myst-free street", "neutral")]
    assert [p.kind for p in read_prompts_file(path, trigger=None)] == ["concept", "concept", "neutral"]
    empty = tmp_path / "e.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(Sd3tuneError, match="no prompts"):
        read_prompts_file(empty, trigger=None)


def test_a_prompts_file_saved_with_a_bom_reads_its_first_line_as_written(tmp_path):
    # Windows editors start UTF-8 files with a BOM: it made the first line's comment a prompt ('\ufeff# ...')
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeff# my prompts\r\nneutral: a red apple\r\nmyst, a tower\r\n".encode("utf-8"))
    assert [(p.text, p.kind) for p in read_prompts_file(path, trigger="myst")] == \
        [("a red apple", "neutral"), ("myst, a tower", "concept")]


def test_repeated_prompts_are_evaluated_once_and_said(trained_run, tiny_clip, tmp_path):
    # they were dropped silently; a repeat keeps its first line's kind
    from sd3tune.commands.evaluate import EvaluateOptions, run_evaluate
    from sd3tune.prompts import distinct_prompts

    path = tmp_path / "p.txt"
    path.write_text("sd3tune-style, a castle\nneutral: a red apple\nsd3tune-style, a castle\nneutral: sd3tune-style, "
                    "a castle\n", encoding="utf-8")
    prompts, repeats = distinct_prompts(read_prompts_file(path, trigger="sd3tune-style"))
    assert [(p.text, p.kind) for p in prompts] == [("sd3tune-style, a castle", "concept"), ("a red apple", "neutral")]
    assert repeats == 2
    result = run_evaluate(EvaluateOptions(run_dir=trained_run, prompts_file=path, seeds=1, steps=2,
                                          clip_model=str(tiny_clip), out=tmp_path / "eval", device="cpu"), progress=False)
    assert [p["text"] for p in result.metrics["prompts"]] == [p.text for p in prompts]
    assert f"2 repeated prompts in {path} left out: each prompt is evaluated once" in result.notes


def test_a_prompts_file_that_is_a_folder_says_so(tmp_path):
    with pytest.raises(Sd3tuneError, match="is a folder, not a file") as info:
        read_prompts_file(tmp_path, trigger=None)
    assert "does not exist" not in info.value.one_line()


def test_default_prompts():
    from sd3tune.prompts import default_prompts

    prompts = default_prompts("myst, a castle", ["myst, a dog", "myst, a dog", "myst, a cat", "myst, a tree",
                                                 "myst, a car"], "myst")
    concept = [p.text for p in prompts if p.kind == "concept"]
    assert concept[0] == "myst, a castle" and len(concept) == 4 and len(set(concept)) == 4
    assert sum(p.kind == "neutral" for p in prompts) == 3
    with pytest.raises(Sd3tuneError):
        default_prompts(None, [], None)

    # a long caption is cut to its first 30 words, keeping the trigger, and said
    long = "myst " + " ".join(f"word{i}" for i in range(200))
    notes: list[str] = []
    prompts = default_prompts(None, [long, "a dog, myst"], "myst", notes=notes)
    assert [p.text for p in prompts if p.kind == "concept"] == [" ".join(long.split()[:30]), "a dog, myst"]
    assert notes == ["1 concept prompt from training captions cut to the first 30 words (the full captions are longer)"]
    late = " ".join(f"word{i}" for i in range(40)) + " myst"
    assert default_prompts(None, [late], "myst")[0].text == "myst, " + " ".join(late.split()[:30])


def test_a_relative_image_folder_is_read_from_the_run_folder_whatever_the_shells_cwd(concept_data, tmp_path,
                                                                                     monkeypatch):
    # SimpleTuner trains in the run folder, so a relative instance_data_dir names a folder there
    import shutil

    from sd3tune.evaluation import training_set
    from sd3tune.simpletuner.backends import ImageBackend
    from sd3tune.simpletuner.layout import RunPaths

    shutil.copytree(concept_data, tmp_path / "images")
    (tmp_path / "run").mkdir()
    (tmp_path / "shell" / "cwd").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "shell" / "cwd")
    backend = ImageBackend(id="art", instance_data_dir="../images", cache_dir_vae="cache/vae")
    found = training_set([backend], RunPaths(tmp_path / "run"))
    assert len(found.images) == len(list(concept_data.glob("*.png"))) and found.captions


def test_contact_sheet_labels_draw_accented_prompts():
    # Pillow's built-in font drew the same box for every non-ASCII letter: "café" and "cafü" looked alike
    from PIL import Image

    from sd3tune.sheets import contact_sheet

    cells = [[Image.new("RGB", (8, 8))]]

    def sheet(label: str) -> bytes:
        return contact_sheet(cells, [label], ["base"], cell=8).tobytes()

    assert sheet("a café") != sheet("a cafü") != sheet("a caf\u25a1")


def test_the_table_shows_no_negative_zero_and_no_spread_for_a_single_value():
    # drift printed as "-0.000 ± 0.000", and KID as "x ± 0.0000" when only one subset was possible
    def stat(mean, std, n):
        return {"mean": mean, "std": std, "n": n}

    metrics = {"base": {"clip_score": stat(30.0, 1.0, 4), "style_similarity": stat(0.5, 0.01, 2),
                        "diversity": stat(0.2, 0.0, 1), "kid": stat(0.01, 0.0, 1), "drift": stat(0.0, 0.0, 2)},
               "lora": {"clip_score": stat(31.0, 1.0, 4), "style_similarity": stat(0.6, 0.01, 2),
                        "diversity": stat(0.1, 0.0, 1), "kid": stat(0.005, 0.0, 1),
                        "drift": stat(-1e-9, 1e-10, 2)}}
    table = format_table({"models": {k: {"title": k, "metrics": v} for k, v in metrics.items()},
                          "best": {"label": "lora"}})
    assert "-0.000" not in table and "0.000 ± 0.000" in table
    lora = table.splitlines()[2]
    assert "0.0050 " in lora + " " and "0.0050 ±" not in lora and "0.100 ±" not in lora


def _kid_inputs(seed: int, training_images: int, prompts: int, seeds: int):
    """Random L2-normalised CLIP-like embeddings (dim 8): the training images', and a base and a LoRA model's
    [prompts, seeds] images."""
    import torch

    from sd3tune.evaluation import ModelImages

    torch.manual_seed(seed)
    real = torch.nn.functional.normalize(torch.randn(training_images, 8), dim=-1)
    models = [ModelImages(label, label, label, None, None, 1.0, []) for label in ("base", "lora")]
    embeddings = {m.label: torch.nn.functional.normalize(torch.randn(prompts, seeds, 8), dim=-1) for m in models}
    return real, models, embeddings


def test_kid_from_the_only_possible_subsets_is_one_value():
    # as many training images as concept-prompt images: every random subset is all of them
    from sd3tune.evaluation import _kid

    real, models, embeddings = _kid_inputs(0, training_images=4, prompts=2, seeds=2)
    notes: list[str] = []
    _, values = _kid(models, [0, 1], 2, real, embeddings, "clip", notes)
    assert all(v["n"] == 1 and v["std"] == 0.0 for v in values.values()), values
    assert any("one value" in n for n in notes)
    _, values = _kid(models, [0], 2, real, embeddings, "clip", [])  # 2-image subsets of 4 training images
    assert all(v["n"] > 1 and v["std"] > 0 for v in values.values()), values


def test_the_kid_definition_says_its_difference_against_the_base_is_not_the_tables():
    # the tables show torchmetrics' KID over random subsets; "vs base" is the unbiased KID of all images at once
    # (stats.kid_paired, what the bootstrap over prompts resamples): the two differences can disagree, and do here
    from sd3tune.evaluation import DEFINITIONS, _kid
    from sd3tune.stats import kid_paired

    real, models, embeddings = _kid_inputs(1, training_images=30, prompts=3, seeds=4)
    _, table = _kid(models, [0, 1, 2], 4, real, embeddings, "clip", [])
    versus = kid_paired(embeddings["base"].numpy(), embeddings["lora"].numpy(), real.numpy())
    assert abs(versus.diff - (table["lora"]["mean"] - table["base"]["mean"])) > 1e-4, (versus.diff, table)
    assert "mean and std over random subsets" in DEFINITIONS["kid"]
    assert ("the difference against the base model is instead the unbiased KID of all the images at once (the one "
            "its bootstrap over prompts resamples), so it can differ from the difference of the two subset means"
            ) in DEFINITIONS["kid"]


def test_an_unreachable_hub_fails_fast_with_the_one_line_error(trained_run, prompts_file, tmp_path):
    # offline without --clip-model (the default CLIP is a Hub id): huggingface_hub retried for ~50 s before the error
    from helpers import UNREACHABLE_HUB, assert_one_line_user_error, sd3tune

    from sd3tune.defaults import DEFAULT_CLIP

    cache = tmp_path / "hf"  # an empty Hugging Face cache
    r = sd3tune("evaluate", trained_run, "--prompts", prompts_file, "--seeds", "1", "--out", tmp_path / "out",
                "--device", "cpu", env={**UNREACHABLE_HUB, "HF_HOME": str(cache), "HF_HUB_CACHE": str(cache / "hub")})
    assert_one_line_user_error(r, f"cannot load CLIP model {DEFAULT_CLIP}", "http://127.0.0.1:9",
                               f"hf download {DEFAULT_CLIP}")
    assert "Retrying" not in r.err, r.err[-2000:]
    assert not (tmp_path / "out").exists()


def test_a_hub_clip_in_the_cache_loads_from_it_at_once_when_the_hub_is_out_of_reach(tiny_clip, tmp_path):
    import subprocess
    import sys

    from helpers import UNREACHABLE_HUB, child_env, hub_cache_with

    cache = hub_cache_with(tiny_clip, "sd3tune-tests/tiny-clip", tmp_path / "hub")
    code = "from sd3tune.clip import ClipModel; print(ClipModel.load('sd3tune-tests/tiny-clip').source)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=child_env(**UNREACHABLE_HUB, HF_HUB_CACHE=str(cache)))
    assert proc.returncode == 0 and proc.stdout.split() == ["Hub"], proc.stderr[-3000:]
    assert "Retrying" not in proc.stderr, proc.stderr[-2000:]


def test_ctrl_c_says_the_unfinished_evaluation_needs_force_to_be_replaced(trained_run, tiny_clip, prompts_file,
                                                                          tmp_path):
    from helpers import interrupted, sd3tune

    out = tmp_path / "eval"
    args = ["evaluate", str(trained_run), "--prompts", str(prompts_file), "--clip-model", str(tiny_clip),
            "--out", str(out), "--device", "cpu", "--seeds", "2", "--steps", "2"]
    r = interrupted(*args, "--checkpoints", "all", when=lambda: any(out.glob("images/*/*.png")))  # 1st image
    err = r.err
    assert r.code == 130, err[-2000:]
    assert err.replace("\r", "\n").splitlines()[-1] == (
        f"error: evaluation interrupted: {out} holds its unfinished images (no metrics.json) "
        "(hint: run it again with --force to replace them)")
    assert "Traceback" not in err and not (out / "metrics.json").exists()
    again = sd3tune(*args, "--force")
    assert again.code == 0, again.err[-2000:]
    assert (out / "metrics.json").exists()


def test_report_md_shows_prompts_and_notes_as_written_not_as_markup(evaluated):
    # report.md wrote them raw: '<b>x</b>' vanished into HTML, '*star*' turned italic, '|' could end a table cell
    import copy
    import re

    from sd3tune.report import render_markdown

    data = copy.deepcopy(evaluated.metrics)
    prompt = r"a *star* <b>x</b> | [link](u) \ _under_ `code` #1"
    data["prompts"][0]["text"] = prompt
    data["notes"] = [prompt]
    md = render_markdown(data, "contact_sheet.png")
    line = next(x for x in md.splitlines() if x.startswith("1. ("))
    shown = re.sub(r"\\(.)", r"\1", line.split(") ", 1)[1])  # what Markdown displays: each \x is a literal x
    assert shown == prompt and "<b>" not in md and "*star*" not in md
    assert re.sub(r"\\(.)", r"\1", md.splitlines()[-1][2:]) == prompt


def test_a_copied_run_says_its_lora_is_the_originals(trained_run, tiny_clip, prompts_file, tmp_path, evaluated):
    # `cp -r run copy; sd3tune evaluate copy` evaluated the original's LoRA without a word (OUTPUT_DIR is absolute)
    import shutil

    from sd3tune.commands.evaluate import EvaluateOptions, run_evaluate

    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("eval*", "cache", "output"))
    result = run_evaluate(EvaluateOptions(run_dir=copy, prompts_file=prompts_file, seeds=1, steps=2,
                                          clip_model=str(tiny_clip), device="cpu"), progress=False)
    lora = trained_run.resolve() / "output" / "pytorch_lora_weights.safetensors"
    assert result.metrics["lora"]["file"] == str(lora)
    assert any(n.startswith(f"the run's LoRA {lora} is outside {copy}: its OUTPUT_DIR points there")
               for n in result.notes), result.notes
    assert not any("is outside" in n for n in evaluated.notes)  # the original run's own evaluation


def test_a_checkpoint_trained_with_other_settings_than_the_lora_is_said(tmp_path):
    # a resumed training changed the shift and resolution: --checkpoints all sampled an earlier checkpoint with the
    # LoRA's settings and said nothing, so its column compared it at settings it never trained with
    import torch
    from safetensors.torch import save_file

    from sd3tune.commands.evaluate import _candidates
    from sd3tune.lora import resolve_lora
    from sd3tune.simpletuner import keys

    output = tmp_path / "output"
    settings = {"sd3tune.flow_schedule_shift": "1.0", "sd3tune.resolution": "128", "sd3tune.lora_rank": "4"}
    for where, value, stamp in ((output, 3.0, settings), (output / "checkpoint-8", 2.0, settings),
                                (output / "checkpoint-4", 1.0, {**settings, "sd3tune.flow_schedule_shift": "3.0",
                                                                "sd3tune.resolution": "64"})):
        where.mkdir(parents=True, exist_ok=True)
        save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.full((4, 32), value)},
                  str(where / keys.LORA_WEIGHT_NAME), metadata=stamp)
    notes: list[str] = []
    models = _candidates(EvaluateOptions(run_dir=tmp_path, checkpoints="all"), output,
                         resolve_lora(output / keys.LORA_WEIGHT_NAME), notes)
    assert [m.label for m in models] == ["base", "checkpoint-4", "checkpoint-8", "lora"]  # step order
    assert notes == ["checkpoint-4 trained with other settings than the LoRA (schedule shift 3.0 -> 1.0, resolution "
                     "64 -> 128): it is sampled with the LoRA's, as every model here"]


def _checkpointed_output(tmp_path: Path) -> Path:
    """output/ with a final LoRA (step 8) and checkpoint-4 and checkpoint-8 (the final LoRA's very weights)."""
    import torch
    from safetensors.torch import save_file

    from sd3tune.simpletuner import keys

    output = tmp_path / "output"
    for where, value, steps in ((output, 3.0, "8"), (output / "checkpoint-8", 3.0, "8"),
                                (output / "checkpoint-4", 1.0, "4")):
        where.mkdir(parents=True, exist_ok=True)
        save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.full((4, 32), value)},
                  str(where / keys.LORA_WEIGHT_NAME), metadata={"sd3tune.steps": steps})
    return output


@pytest.mark.parametrize("which, labels, steps", [
    ("latest", ["base", "lora"], [None, 8]),
    ("all", ["base", "checkpoint-4", "lora"], [None, 4, 8]),
    ("8,4", ["base", "checkpoint-4", "lora"], [None, 4, 8]),  # checkpoint-8 is the final LoRA: shown as it
    ("4", ["base", "checkpoint-4"], [None, 4]),
])
def test_checkpoints_by_step_number_in_step_order(which, labels, steps, tmp_path):
    # `--checkpoints 20` was refused, and the columns came as base, LoRA, then the checkpoints
    from sd3tune.commands.evaluate import _candidates
    from sd3tune.lora import resolve_lora
    from sd3tune.simpletuner import keys

    output = _checkpointed_output(tmp_path)
    notes: list[str] = []
    models = _candidates(EvaluateOptions(run_dir=tmp_path, checkpoints=which), output,
                         resolve_lora(output / keys.LORA_WEIGHT_NAME), notes)
    assert [m.label for m in models] == labels and [m.step for m in models] == steps


def test_a_checkpoint_step_the_run_lacks_is_refused_with_the_steps_it_has(tmp_path):
    from sd3tune.commands.evaluate import _candidates
    from sd3tune.lora import resolve_lora
    from sd3tune.simpletuner import keys

    output = _checkpointed_output(tmp_path)
    with pytest.raises(Sd3tuneError) as info:
        _candidates(EvaluateOptions(run_dir=tmp_path, checkpoints="4,6"), output,
                    resolve_lora(output / keys.LORA_WEIGHT_NAME), [])
    assert info.value.message == f"--checkpoints 4,6: no checkpoint-6 with a LoRA in {output}"
    assert "steps: 4, 8" in info.value.hint
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path), "--checkpoints", "ten"])
    assert isinstance(result.exception, Sd3tuneError) and "'ten' is not one of latest, all, N,M" in \
        result.exception.message


def test_a_full_disk_is_found_before_any_model_loads(trained_run, prompts_file, tmp_path, monkeypatch):
    # on a full disk, evaluate generated every image before its first write failed
    from collections import namedtuple

    import sd3tune.fsutil as fsutil

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(fsutil.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 50_000, 50_000))
    out = tmp_path / "out"
    opts = EvaluateOptions(run_dir=trained_run, prompts_file=prompts_file, seeds=SEEDS, steps=STEPS, out=out,
                           clip_model=str(tmp_path / "no-clip-here"), device="cpu")  # never loaded: refused first
    with pytest.raises(Sd3tuneError) as info:
        run_evaluate(opts, progress=False)
    assert info.value.message.startswith(f"{out} has 0.0 MiB free; writing this evaluation's 8 images at 64x64, the "
                                         "contact sheet and reports needs about ")
    assert info.value.message.endswith("; nothing was generated")
    assert "--seeds" in info.value.hint and not (out / "images").exists()


def test_a_failed_image_write_stops_the_generation_at_once(trained_run, tiny_clip, prompts_file, tmp_path,
                                                           monkeypatch):
    import sd3tune.evalgen as evalgen
    import sd3tune.inference as inference

    made = []
    real_make = inference.make_images
    monkeypatch.setattr(inference, "make_images", lambda *a, **k: made.append(1) or real_make(*a, **k))

    def full_disk(made_batch, index, path, fields):
        raise Sd3tuneError(f"cannot write {path}: No space left on device", hint="free some disk space")

    monkeypatch.setattr(evalgen, "_save_image", full_disk)
    opts = _opts(trained_run, tiny_clip, prompts_file, tmp_path / "out", batch_size=1, checkpoints="all")
    with pytest.raises(Sd3tuneError, match="No space left on device"):
        run_evaluate(opts, progress=False)
    assert len(made) == 2  # of 3 models x 2 prompts x 2 seeds = 12 batches: the first write's failure stops it


@pytest.mark.skipif(__import__("shutil").which("chromium") is None,
                    reason="needs Debian's chromium (.ci/run installs it)")
@pytest.mark.parametrize("width", [800, 1400])
def test_report_html_fits_the_window_and_shows_every_image_in_chromium(evaluated, width, tmp_path):
    """report.html in a real browser: no sideways page scroll, every <img> loaded (the grid, the validation images)."""
    import re
    import shutil
    import subprocess

    from PIL import Image

    from sd3tune.report_html import render_html

    out = Path(shutil.copytree(evaluated.out, tmp_path / "eval"))
    data = json.loads((out / "metrics.json").read_text())
    (out / "validation").mkdir()
    for i in range(2):  # as SimpleTuner names them; the tiny run trains with validation off
        Image.new("RGB", (128, 128), (40 * i, 90, 160)).save(out / "validation" / f"step_20_castle_{i}_128x128.png")
    data["training"]["validation_images"].update(step=20, files=[f"validation/step_20_castle_{i}_128x128.png"
                                                                 for i in range(2)])
    data["prompts"][0]["text"] = "sd3tune-style, " + " ".join(f"verylongword{i}" for i in range(150))
    page = render_html(data, "contact_sheet.png")
    probe = ("<script>addEventListener('load',()=>{const d=document.documentElement;const p=document.createElement"
             "('pre');p.id='probe';p.textContent=JSON.stringify({scroll:d.scrollWidth,inner:innerWidth,images:"
             "[...document.images].map(i=>[i.getAttribute('src'),i.naturalWidth])});document.body.appendChild(p)})"
             "</script>")
    (out / "probe.html").write_text(page.replace("</body>", probe + "</body>"), encoding="utf-8")
    proc = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--window-size={width},900", "--virtual-time-budget=5000", "--dump-dom",
                           (out / "probe.html").as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout)
    assert found, proc.stderr[-2000:]
    probe_data = json.loads(found.group(1).replace("&quot;", '"'))
    assert probe_data["inner"] == width and probe_data["scroll"] <= probe_data["inner"], probe_data
    images = probe_data["images"]
    assert len(images) == 2 * 3 + 2 and all(w > 0 for _, w in images), images  # 2 prompts x 3 models + validation
