"""Rules from the base model's own files (checks/model.py): the largest image side its transformer places, proven
against diffusers' own SD3 transformer."""

from __future__ import annotations

import pytest
from check_helpers import backend_set, check, env_set, section, extra_args
from helpers import hub_cache_with

from sd3tune.checks.model import read_size_limit


def test_the_limit_is_exactly_where_diffusers_sd3_transformer_refuses(tiny_model):
    # the tiny model: pos_embed_max_size 64 x patch 2 x VAE scale 8 = 1024 px per side
    import torch
    from diffusers import SD3Transformer2DModel

    limit = read_size_limit(tiny_model)
    assert limit is not None and limit.max_side == 1024
    patch_embed = SD3Transformer2DModel.from_pretrained(tiny_model / "transformer").pos_embed
    for width, height in [(1024, 1024), (1024, 640), (1088, 1024), (1024, 1088), (1152, 896), (64, 2048)]:
        latent = torch.zeros(1, 16, height // limit.vae_scale, width // limit.vae_scale)
        try:
            patch_embed(latent)
            refused = None
        except ValueError as exc:
            refused = str(exc)
        assert limit.refusal(width, height) == refused, (width, height)
    assert limit.refusal(1024, 1088) == "Height (68) cannot be greater than `pos_embed_max_size`: 64."


def test_a_bucket_over_the_models_largest_side_is_an_error_naming_it_and_the_largest_allowed(make_run):
    # check said ok at 1024 px and train failed 79 s later: `Height (72) cannot be greater than pos_embed_max_size: 64`
    run, data = make_run()
    backend_set(run, resolution=1024)
    assert "too large" not in check(run)[0].output  # at the edge: 1024x1024
    backend_set(run, resolution=1088)
    errors = section(check(run)[0].output, "error")
    assert "multidatabackend.json:images.resolution: dataset 'images': aspect bucket 1088x1088 is too large: " in errors
    assert "places at most 1024 px per side (transformer pos_embed_max_size 64 x patch 2 x VAE scale 8)" in errors
    assert "(Height (68) cannot be greater than `pos_embed_max_size`: 64.)" in errors

    from PIL import Image

    backend_set(run, resolution=768, crop=False)  # a wide image's bucket is wider than the resolution
    for name in ("wide", "wider"):  # two: a batch of 2 (a bucket smaller than the batch is dropped)
        Image.new("RGB", (128, 64)).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text("a wide castle")
    errors = section(check(run)[0].output, "error")
    assert "aspect bucket 1536x768 is too large" in errors and "768x768" not in errors
    assert "Width (96) cannot be greater than `pos_embed_max_size`: 64." in errors


def test_the_validation_size_is_held_to_the_same_limit_when_validation_runs(make_run):
    run, _ = make_run()
    env_set(run, "VALIDATION_RESOLUTION", "1024x1088")
    assert "VALIDATION_RESOLUTION" not in check(run)[0].output  # validation is off in this run
    extra_args(run, "--validation_disable=true", "--validation_disable=false")
    errors = section(check(run)[0].output, "error")
    assert "config.env:VALIDATION_RESOLUTION (line" in errors and "1024x1088 is too large" in errors
    assert "use at most 1024x1024" in errors
    env_set(run, "VALIDATION_RESOLUTION", "1024x1024")
    assert check(run)[0].exit_code == 0


@pytest.mark.parametrize("cached", [True, False])
def test_a_hub_model_is_read_from_the_cache_and_skipped_quietly_when_not_there(make_run, tiny_model, tmp_path,
                                                                                cached):
    run, _ = make_run()
    backend_set(run, resolution=1088)
    env_set(run, "MODEL_NAME", "someone/tiny-sd3")
    cache = tmp_path / "hub"
    if cached:
        hub_cache_with(tiny_model, "someone/tiny-sd3", cache)
    else:
        cache.mkdir()
    result, _ = check(run, env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert ("1088x1088 is too large: someone/tiny-sd3 places at most 1024 px" in result.output) == cached
    if not cached:  # the model's own finding, not one about sizes
        assert "not in the Hugging Face cache" in result.output and "too large" not in result.output
