"""bench_generate.py at tiny size on CPU (with the LoRA bench_train.py trained), its variants and candidates, and what
it reports when a variant fails or its anchor ran other steps. The numbers themselves are not checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_helpers import NOT_ACCEPTANCE, positive, run_script
from helpers import sd3_transformer_inputs

pytestmark = pytest.mark.bench


@pytest.mark.e2e
def test_bench_generate_runs_at_tiny_size(train_bench, bench_work):
    # Reuses the tiny model bench_train built, and generates with the LoRA it trained.
    variants = ("default", "compile", "fp8", "compile-qkv", "compile-autotune")
    proc, result = run_script("bench_generate.py", "--size", "tiny", "--work", str(bench_work), "--variants",
                              ",".join(variants), "--images", "4", "--batch-size", "2", "--steps", "2",
                              "--anchor-images", "1", "--lora", str(bench_work / "runs" / "default"), "--profile",
                              timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert result["bench"] == "generate" and result["model_build_s"] == 0.0  # reused, not rebuilt
    for key in ("anchor.s_per_image", "anchor.time_to_first_image_s", "default.s_per_image",
                "default.time_to_first_image_s", "default.peak_mem_gib", "default.ratio_s_per_image",
                *(f"{name}.s_per_image" for name in variants[1:])):
        positive(result, key)
    assert result["default.verdict"] == NOT_ACCEPTANCE
    assert "LoRA fused into the transformer weights" in result["compile.notes"], result["compile.notes"]
    assert any("nothing compiled on cpu" in note for note in result["compile.notes"]), result["compile.notes"]
    assert result["compile.mean_abs_diff_vs_default"] < 0.5  # fusing the LoRA only rounds differently
    # the q/k/v candidate applied on CPU too: both tiny blocks changed, the images those of compile
    assert "candidate: q/k/v fused into one matmul per stream in 2 attention layers" in result["compile-qkv.notes"]
    assert result["compile-qkv.mean_abs_diff_vs_compile"] < 0.5
    assert "candidate: 0 blocks compiled with max-autotune-no-cudagraphs" in result["compile-autotune.notes"]  # CPU
    assert any(note.startswith("--fp8: 21 transformer matmuls in FP8") for note in result["fp8.notes"])
    assert 0 < result["fp8.mean_abs_diff_vs_compile"] < 5  # e4m3 moves the images, a little
    for name in variants:  # --profile: one warm batch each, on CPU without GPU numbers
        positive(result, f"{name}.profile_wall_s_per_image")
        assert result[f"{name}.profile_gpu_busy_s_per_image"] == 0.0
        assert json.loads(Path(result[f"{name}.profile_summary"]).read_text())["cpu_ops_per_step"]


@pytest.mark.e2e
def test_a_variant_that_fails_is_reported_and_the_next_one_still_runs(train_bench, bench_work, monkeypatch, capsys):
    import bench_generate

    def broken(transformer):
        raise RuntimeError("cuDNN Frontend error: no valid execution plan\nmore detail")

    monkeypatch.setitem(bench_generate.CANDIDATES, "compile-qkv", (broken, "{}"))
    code = bench_generate.main(["--size", "tiny", "--work", str(bench_work), "--variants", "compile-qkv,compile",
                                "--images", "4", "--batch-size", "2", "--steps", "2", "--anchor-images", "1"])
    out = capsys.readouterr().out
    result = json.loads(out.splitlines()[-1][len("RESULT "):])
    assert code == 1
    assert result["compile-qkv.error"] == "RuntimeError: cuDNN Frontend error: no valid execution plan"
    assert "compile-qkv.s_per_image" not in result
    positive(result, "compile.s_per_image")


@pytest.mark.e2e
def test_the_qkv_candidate_computes_sd3_mediums_blocks_and_leaves_normalised_q_k_alone(tiny_model):
    import torch
    from diffusers import SD3Transformer2DModel

    from bench_generate import fuse_qkv

    config = SD3Transformer2DModel.load_config(tiny_model / "transformer")
    for qk_norm, fused in ((None, config["num_layers"]), ("rms_norm", 0)):  # SD3 Medium; SD3.5-style q/k norms
        torch.manual_seed(0)
        model = SD3Transformer2DModel.from_config({**config, "qk_norm": qk_norm}).eval()
        args = sd3_transformer_inputs(config)  # a batch of 2; the tiny model's last block is context-pre-only
        with torch.inference_mode():
            before = model(*args).sample
            assert fuse_qkv(model) == fused
            after = model(*args).sample
        assert torch.allclose(after, before, atol=1e-5), (qk_norm, (after - before).abs().max())
        assert sum(hasattr(b.attn, "to_qkv") for b in model.transformer_blocks) == fused


@pytest.mark.e2e
def test_bench_generate_prints_no_ratio_when_its_steps_differ_from_the_anchor_jsons(train_bench, bench_work, tmp_path,
                                                                                    capsys):
    import bench_generate

    anchor = tmp_path / "anchor.json"
    anchor.write_text(json.dumps({"gpu": "test card", "gen_1024_28steps_cfg_s": 1.6}))  # a full-size anchor: 28
    assert bench_generate.anchor_json_steps(anchor) == 28
    anchor.write_text(json.dumps({"gen_1024_28steps_cfg_s": 0.25}))  # anchor_sd3m.py --tiny logs no gpu: 2 steps
    assert bench_generate.anchor_json_steps(anchor) == 2
    code = bench_generate.main(["--size", "tiny", "--work", str(bench_work), "--variants", "default", "--images", "2",
                                "--batch-size", "1", "--steps", "3", "--anchor-json", str(anchor)])
    out = capsys.readouterr().out
    result = json.loads(out.splitlines()[-1][len("RESULT "):])
    assert code == 0
    assert result["anchor.steps"] == 2 and result["default.steps"] == 3 and result["default.s_per_image"] > 0
    assert result["default.ratio_s_per_image"] is None
    assert ("default.ratio_s_per_image: None  (no ratio: the anchor ran 2 denoising steps, sd3tune --steps 3)"
            in out)
