"""`sd3tune export` and the LoRA's strength outside sd3tune, on one LoRA trained for real through SimpleTuner on a tiny
SD3 in the shape kohya and ComfyUI accept, rank 16, alpha 4 (``kohya_run``: trained strength 0.25).

The kohya checks here do not reuse sd3tune's converter: they apply the loaders' own rules as written in the sources
(kohya-ss/sd-scripts 48d368f networks/lora_sd3.py, Comfy-Org/ComfyUI a125cd8 comfy/lora.py, comfy/weight_adapter/
lora.py, comfy/utils.py mmdit_to_diffusers): key ``lora_unet_`` + the MMDiT module path, scale ``alpha / rows of
lora_down``, q/k/v = row thirds of ``qkv``.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from helpers import assert_one_line_user_error, sd3tune, sd3tune_process

SD3M = "stabilityai/stable-diffusion-3-medium-diffusers"
LORA = "output/pytorch_lora_weights.safetensors"


def tensors_of(file: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def copy_run(run: Path, to: Path) -> Path:
    """A copy of the run that is its own (OUTPUT_DIR relative, so the copy's output is the copy's)."""
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("cache", "export"))
    env = to / "config" / "config.env"
    env.write_text(re.sub(r"^OUTPUT_DIR=.*$", "OUTPUT_DIR='output'", env.read_text(), flags=re.M))
    return to


def front_matter(card: Path) -> dict:
    import yaml

    text = card.read_text()
    assert text.startswith("---\n"), text[:80]
    return yaml.safe_load(text.split("---\n", 2)[1])


# ----------------------------------------------------------------------------------------------- the final LoRA


def test_diffusers_applies_the_trained_strength_from_the_final_lora_and_its_checkpoints(kohya_run):
    """The final file (and each checkpoint) carries diffusers' lora_adapter_metadata: plain `load_lora_weights`
    gives the images of the LoRA loaded with its scale set to 0.25 by hand, not those at strength 1."""
    import numpy as np
    import torch
    from diffusers import StableDiffusion3Pipeline

    final = kohya_run / LORA
    tensors, meta = tensors_of(final)
    peft = json.loads(meta["lora_adapter_metadata"])
    assert (peft["transformer.r"], peft["transformer.lora_alpha"]) == (16, 4.0)
    checkpoint = kohya_run / "output" / "checkpoint-3" / "pytorch_lora_weights.safetensors"
    ck_meta = tensors_of(checkpoint)[1]
    assert json.loads(ck_meta["lora_adapter_metadata"])["transformer.lora_alpha"] == 4.0  # SimpleTuner's, kept
    assert ck_meta["sd3tune.steps"] == "3"

    pipe = StableDiffusion3Pipeline.from_pretrained(kohya_run.parent / "model", dtype=torch.float32)

    def image() -> np.ndarray:
        return pipe("sd3tune-style, a castle", num_inference_steps=2, height=64, width=64, output_type="np",
                    max_sequence_length=154, generator=torch.Generator().manual_seed(0)).images[0]

    pipe.load_lora_weights(str(final.parent), weight_name=final.name, adapter_name="plain")  # no sd3tune code
    plain = image()
    pipe.delete_adapters("plain")
    pipe.load_lora_weights(dict(tensors), adapter_name="by_hand")  # the tensors alone: peft takes alpha = rank
    pipe.set_adapters(["by_hand"], adapter_weights=[4 / 16])
    by_hand = image()
    pipe.set_adapters(["by_hand"], adapter_weights=[1.0])
    full = image()
    assert np.abs(plain - by_hand).max() < 1e-6
    assert np.abs(full - by_hand).max() > 1e-3  # the strength shows in the images: the check above can fail


# ----------------------------------------------------------------------------------------------- export


def test_export_writes_every_format_and_a_card_the_loaders_read_at_the_trained_strength(kohya_run, tmp_path):
    run = copy_run(kohya_run, tmp_path / "myst")
    r = sd3tune("export", run, "--base-model", SD3M)
    assert r.code == 0, r.err
    out = run / "export"
    kohya_file = out / "myst.safetensors"
    assert {p.name for p in out.iterdir()} == {"pytorch_lora_weights.safetensors", "myst.safetensors", "README.md"}
    assert r.out.split() == [str(out / "pytorch_lora_weights.safetensors"), str(kohya_file), str(out / "README.md")]

    original, _ = tensors_of(run / LORA)
    diffusers, d_meta = tensors_of(out / "pytorch_lora_weights.safetensors")
    assert diffusers.keys() == original.keys() and all(diffusers[k].equal(original[k]) for k in original)
    assert json.loads(d_meta["lora_adapter_metadata"])["transformer.lora_alpha"] == 4.0

    kohya, k_meta = tensors_of(kohya_file)
    for meta in (d_meta, k_meta):  # no local path leaves the machine (the run was trained from a local model folder)
        assert "sd3tune.run_dir" not in meta and meta["sd3tune.base_model"] == SD3M
        assert not any(str(tmp_path) in v or str(kohya_run) in v for v in meta.values())
    modules = {f"lora_unet_joint_blocks_{n}_x_block_attn_{m}" for n in (0, 1) for m in ("qkv", "proj")}
    assert set(kohya) == {f"{m}.{part}" for m in modules for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert k_meta["ss_network_dim"] == "16" and k_meta["ss_network_alpha"] == "4.0"
    covered = set()
    for n in (0, 1):
        def merged(module: str):  # as sd-scripts and ComfyUI apply it
            down, up = kohya[f"{module}.lora_down.weight"].double(), kohya[f"{module}.lora_up.weight"].double()
            return float(kohya[f"{module}.alpha"]) / down.shape[0] * (up @ down)

        qkv = merged(f"lora_unet_joint_blocks_{n}_x_block_attn_qkv")
        parts = dict(zip(("to_q", "to_k", "to_v"), qkv.chunk(3))) | {
            "to_out.0": merged(f"lora_unet_joint_blocks_{n}_x_block_attn_proj")}
        for layer, delta in parts.items():
            key = f"transformer.transformer_blocks.{n}.attn.{layer}"
            a, b = original[f"{key}.lora_A.weight"].double(), original[f"{key}.lora_B.weight"].double()
            expected = 4 / 16 * (b @ a)
            assert (delta - expected).abs().max() <= 1e-5 * expected.abs().max(), key
            covered |= {f"{key}.lora_A.weight", f"{key}.lora_B.weight"}
    assert covered == set(original)  # nothing dropped

    card = front_matter(out / "README.md")
    assert card["base_model"] == SD3M and card["base_model_relation"] == "adapter"
    assert card["instance_prompt"] == "sd3tune-style" and card["library_name"] == "diffusers"
    assert card["license"] == "other" and card["license_name"] == "stabilityai-ai-community" and card["license_link"]
    assert "not-for-all-audiences" not in card["tags"]
    body = (out / "README.md").read_text()
    assert "| 6 | 16 | 4 | 0.25 | 64 px | 8 |" in body  # steps, rank, alpha, strength, resolution, images
    assert 'joint_attention_kwargs={"scale": 1.0}' in body and "<lora:myst:1>" in body
    exports = json.loads((run / "sd3tune.json").read_text())["exports"]
    assert exports[-1]["formats"] == ["diffusers", "kohya", "comfyui"] and exports[-1]["base_model"] == SD3M

    again = sd3tune("export", run, "--base-model", SD3M)  # the user's files stay
    assert_one_line_user_error(again, "already exist", "nothing was written")
    assert sd3tune("export", run, "--base-model", SD3M, "--force").code == 0


PROMPT = "sd3tune-style, concept art of a castle on a hill"  # kohya_run's validation prompt


def validation_images(run: Path, *names: str) -> Path:
    """Validation images as SimpleTuner 4.10 names them (helpers/training/validation_images.py save_images:
    step_{step}_{prompt shortname}_{index}_{WxH}; the main prompt's shortname is ``validation``), each its own."""
    from PIL import Image

    folder = run / "output" / "validation_images"
    folder.mkdir()
    for n, name in enumerate(names):
        Image.new("RGB", (64, 64), (10, 20 * n, 10)).save(folder / name)
    return folder


def test_comfyui_gets_the_kohya_file_and_the_card_shows_validation_samples(kohya_run, tmp_path):
    """A checkpoint's card shows the main prompt's images of its steps: not those sampled after it, nor those of
    the prompt library's other prompts or of the empty prompt (which the main prompt would mislabel)."""
    run = copy_run(kohya_run, tmp_path / "run")
    validation = validation_images(run, "step_3_validation_0_64x64.png", "step_3_prompt_2_0_64x64.png",
                                   "step_3_unconditional_0_64x64.png", "step_6_validation_0_64x64.png")
    out = tmp_path / "comfy"
    r = sd3tune("export", run / "output" / "checkpoint-3", "--format", "comfyui", "--out", out, "--base-model", SD3M)
    assert r.code == 0, r.err
    assert {p.name for p in out.iterdir()} == {"run-checkpoint-3.safetensors", "README.md", "images"}
    card = front_matter(out / "README.md")
    assert card["widget"] == [{"text": PROMPT, "output": {"url": "images/00.png"}}]
    assert [p.name for p in (out / "images").iterdir()] == ["00.png"]
    assert (out / "images" / "00.png").read_bytes() == (validation / "step_3_validation_0_64x64.png").read_bytes()
    assert "pytorch_lora_weights" not in (out / "README.md").read_text()


def test_the_final_loras_card_shows_no_validation_image_of_a_later_training(kohya_run, tmp_path):
    """The run's LoRA has 6 steps; a resumed training that stopped before saving one sampled step 9: not its image."""
    run = copy_run(kohya_run, tmp_path / "run")
    validation = validation_images(run, "step_3_validation_0_64x64.png", "step_6_validation_0_64x64.png",
                                   "step_6_prompt_2_0_64x64.png", "step_9_validation_0_64x64.png")
    r = sd3tune("export", run, "--format", "diffusers", "--base-model", SD3M)
    assert r.code == 0, r.err
    out = run / "export"
    card = front_matter(out / "README.md")
    assert card["widget"] == [{"text": PROMPT, "output": {"url": f"images/{i:02d}.png"}} for i in (0, 1)]
    for i, step in enumerate((3, 6)):
        assert (out / "images" / f"{i:02d}.png").read_bytes() == \
            (validation / f"step_{step}_validation_0_64x64.png").read_bytes()


def test_the_card_carries_the_evaluation_of_this_lora(kohya_run, tmp_path):
    """An `sd3tune evaluate` of this very file (matched by SHA-256) gives the card its numbers and samples."""
    from PIL import Image

    from sd3tune.fsutil import file_sha256
    from sd3tune.report import record_in_manifest

    run = copy_run(kohya_run, tmp_path / "run")
    ev = run / "eval"
    (ev / "images" / "lora").mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(ev / "images" / "lora" / "00-s0.png")
    metric = {"clip_score": {"mean": 0.25}, "style_similarity": {"mean": 0.5}}
    data = {"created": "2026-12-01T00:00:00+00:00", "best": {"label": "lora"}, "clip_model": {"name": "clip"},
            "lora": {"sha256": file_sha256(run / LORA)},
            "prompts": [{"text": "sd3tune-style, a castle", "kind": "concept"}, {"text": "an apple", "kind": "neutral"}],
            "models": {"base": {"title": "base", "kind": "base", "metrics": metric, "images": [[], []]},
                       "lora": {"title": "LoRA", "kind": "lora", "metrics": metric,
                                "images": [["images/lora/00-s0.png"], ["images/lora/01-s0.png"]]}}}
    (ev / "metrics.json").write_text(json.dumps(data))
    record_in_manifest(run, ev, data)
    r = sd3tune("export", run, "--format", "diffusers", "--base-model", SD3M)
    assert r.code == 0, r.err
    card = front_matter(run / "export" / "README.md")
    assert card["widget"] == [{"text": "sd3tune-style, a castle", "output": {"url": "images/00.png"}}]
    assert "| LoRA | 0.25 | 0.5 |" in (run / "export" / "README.md").read_text()


def test_an_export_that_would_drop_a_key_is_refused_naming_it(kohya_run, tmp_path):
    import torch
    from safetensors.torch import save_file

    tensors, meta = tensors_of(kohya_run / LORA)
    tensors["transformer.pos_embed.proj.lora_A.weight"] = torch.zeros(16, 4)
    tensors["transformer.pos_embed.proj.lora_B.weight"] = torch.zeros(4, 16)
    save_file(tensors, tmp_path / "extra.safetensors", metadata=meta)
    r = sd3tune("export", tmp_path / "extra.safetensors", "--format", "kohya", "--out", tmp_path / "out",
                "--base-model", SD3M)
    assert_one_line_user_error(r, "transformer.pos_embed.proj", "would drop it")
    assert not (tmp_path / "out").exists()


def test_a_lora_sd3tune_did_not_make_gets_one_line(kohya_run, tmp_path):
    from safetensors.torch import save_file

    tensors, _ = tensors_of(kohya_run / LORA)
    save_file(tensors, tmp_path / "bare.safetensors")  # no metadata at all
    assert_one_line_user_error(sd3tune("export", tmp_path / "bare.safetensors", "--out", tmp_path / "o1",
                                       "--base-model", SD3M), "records no alpha or rank")
    kohya = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": tensors[next(iter(tensors))]}
    save_file(kohya, tmp_path / "kohya.safetensors", metadata={"sd3tune.lora_rank": "16", "sd3tune.lora_alpha": "4"})
    assert_one_line_user_error(sd3tune("export", tmp_path / "kohya.safetensors", "--out", tmp_path / "o2"),
                               "is not an SD3 transformer LoRA")
    flux = {k.replace("transformer_blocks", "single_transformer_blocks"): v for k, v in tensors.items()}
    save_file(flux, tmp_path / "flux.safetensors", metadata=tensors_of(kohya_run / LORA)[1])
    assert_one_line_user_error(sd3tune("export", tmp_path / "flux.safetensors", "--out", tmp_path / "o3",
                                       "--base-model", SD3M, "--format", "kohya"), "has no kohya SD3 key")
    assert_one_line_user_error(sd3tune("export", kohya_run), "local folder", "--base-model")
    assert_one_line_user_error(sd3tune("export", kohya_run, "--format", "onnx"), "'onnx' is not one of diffusers")
    assert not any((tmp_path / d).exists() for d in ("o1", "o2", "o3"))


# ----------------------------------------------------------------------------------------------- the Hub


def test_push_offline_fails_within_two_seconds_with_one_line(kohya_run, tmp_path):
    started = time.perf_counter()
    r = sd3tune_process("export", kohya_run, "--push-to-hub", "me/myst", "--out", tmp_path / "out",
                        env={"HF_HUB_OFFLINE": "1"})
    assert time.perf_counter() - started <= 2.0
    assert_one_line_user_error(r, "cannot push to me/myst", "offline mode is on", "nothing was exported")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, private, existing", [((), True, None), (("--public",), False, None),
                                                     ((), True, False)])
def test_push_uploads_the_export_folder_private_by_default(kohya_run, tmp_path, monkeypatch, flag, private, existing):
    import types

    import huggingface_hub

    from sd3tune import hub

    calls = []
    repos = {} if existing is None else {"me/myst": existing}  # existing: a repository already there (public)

    class FakeApi:  # the Hub's side: what sd3tune asks of it
        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw))
            repos.setdefault(repo_id, kw["private"])  # exist_ok: an existing repository keeps its visibility
            return f"https://huggingface.co/{repo_id}"

        def model_info(self, repo_id):
            return types.SimpleNamespace(private=repos[repo_id])

        def upload_folder(self, folder_path, repo_id, **kw):
            calls.append(("upload", repo_id, sorted(kw["allow_patterns"])))
            assert all((Path(folder_path) / name).is_file() for name in kw["allow_patterns"])

    monkeypatch.setattr(hub, "check_push", lambda repo_id: None)  # the Hub in reach, a token found
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    run = copy_run(kohya_run, tmp_path / "run")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("the user's, not pushed")
    r = sd3tune("export", run, "--out", tmp_path / "out", "--base-model", SD3M, "--push-to-hub", "me/myst", *flag)
    assert r.code == 0, r.err
    assert calls[0] == ("create", "me/myst", {"repo_type": "model", "private": private, "exist_ok": True})
    assert calls[1] == ("upload", "me/myst", ["README.md", "pytorch_lora_weights.safetensors", "run.safetensors"])
    assert "pushed: https://huggingface.co/me/myst" in r.err
    if existing is None:  # what the Hub reports, as asked
        assert f"pushed: https://huggingface.co/me/myst ({'private' if private else 'public'})" in r.err
        assert "did not change it" not in r.err
    else:  # asked private, but the repository was public before: said as public, with why
        assert "pushed: https://huggingface.co/me/myst (public)" in r.err
        assert "note: me/myst already existed and is public: --private did not change it" in r.err
    assert "me/myst" in (tmp_path / "out" / "README.md").read_text()  # the snippet loads it from the Hub
