"""bench_generate.py at tiny size on CPU: what it reports when a variant fails or its anchor ran other steps, and
the q/k/v candidate's maths. Its run over every variant is test_bench_suite.py's generate stage. The numbers
themselves are not checked."""

from __future__ import annotations

import json

import pytest
from bench_helpers import positive
from helpers import sd3_transformer_inputs

pytestmark = pytest.mark.bench


# bench_generate.py's run at tiny size (every variant and candidate, profiled) is the generate stage of
# test_bench_suite.py's run: one generate process for both


@pytest.mark.e2e
def test_a_variant_that_fails_is_reported_and_the_next_one_still_runs(bench_work, monkeypatch, capsys):
    import bench_generate

    def broken(transformer):
        raise RuntimeError("cuDNN Frontend error: no valid execution plan\nmore detail")

    monkeypatch.setitem(bench_generate.CANDIDATES, "compile-qkv", (broken, "{}"))
    code = bench_generate.main(["--size", "tiny", "--work", str(bench_work), "--variants", "compile-qkv,compile",
                                "--images", "4", "--batch-size", "2", "--steps", "2", "--anchor-images", "1"])
    out = capsys.readouterr().out
    result = json.loads(out.splitlines()[-1][len("RESULT "):])
    assert code == 1
    # without --anchor-json it times its own anchor (the plain diffusers pipeline) first
    for key in ("anchor.s_per_image", "anchor.time_to_first_image_s"):
        positive(result, key)
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
def test_bench_generate_prints_no_ratio_when_its_steps_differ_from_the_anchor_jsons(bench_work, tmp_path, capsys):
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
