"""`sd3tune generate` on the tiny SD3 and the LoRA trained by SimpleTuner."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_user_error, sd3_transformer_inputs, sd3tune
from PIL import Image

from sd3tune.commands.generate import GenerateOptions, run_generate
from sd3tune.errors import Sd3tuneError
from sd3tune.lora import resolve_lora
from sd3tune.simpletuner import keys

PROMPT = "sd3tune-style, concept art of a castle"


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)


def gen(out: Path, **kw) -> list[Path]:
    opts = GenerateOptions(prompts=kw.pop("prompts", [PROMPT]), out=out, steps=6, num_images=2, **kw)
    return [i.path for i in run_generate(opts, progress=False).images]


@pytest.fixture(scope="module")
def lora_images(trained_run, tmp_path_factory):
    return gen(tmp_path_factory.mktemp("lora"), lora=trained_run)


def test_same_seed_gives_identical_images(trained_run, lora_images, tmp_path):
    again = gen(tmp_path, lora=trained_run)
    assert [pixels(a).tobytes() for a in again] == [pixels(b).tobytes() for b in lora_images]
    assert pixels(lora_images[0]).tobytes() != pixels(lora_images[1]).tobytes()  # seed 0 vs seed 1


def test_scale_zero_equals_the_base_model_and_the_lora_changes_the_image(trained_run, tiny_model, lora_images,
                                                                         tmp_path):
    zero = gen(tmp_path / "zero", lora=trained_run, scale=0.0)
    base = gen(tmp_path / "base", model=str(tiny_model), width=64, height=64, max_sequence_length=154)
    for z, b in zip(zero, base):
        assert np.array_equal(pixels(z), pixels(b))
    diff = np.mean([np.abs(pixels(a) - pixels(b)).mean() for a, b in zip(lora_images, base)])
    assert diff >= 1.0, f"LoRA moved the image by only {diff:.3f}/255"


def test_png_metadata_records_how_the_image_was_made(trained_run, lora_images):
    text = Image.open(lora_images[1]).text
    assert text["sd3tune:prompt"] == PROMPT and text["sd3tune:seed"] == "1"
    blob = json.loads(text["sd3tune"])
    assert blob["lora"].endswith("pytorch_lora_weights.safetensors") and blob["lora_scale"] == 1.0
    lora = Path(blob["lora"])  # the exact weights, after a retrain has replaced the file at that path
    assert blob["lora_sha256"] == text["sd3tune:lora_sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest()
    assert blob["max_sequence_length"] == 154 and blob["scheduler_shift"] == 3.0 and blob["steps"] == 6
    assert blob["drop_t5"] is False
    assert "Seed: 1" in text["parameters"]
    # no negative prompt: null in the JSON and no text chunk (an empty one read as an empty negative prompt)
    assert blob["negative_prompt"] is None and "sd3tune:negative_prompt" not in text
    assert "Negative prompt" not in text["parameters"]
    # the LoRA in the A1111 parameters, as A1111 names one
    assert f'Lora hashes: "pytorch_lora_weights: {blob["lora_sha256"][:12]}"' in text["parameters"]


def test_png_text_chunks_agree_with_the_json_chunk(tmp_path):
    from sd3tune.inference import save_png

    fields = {"prompt": "a castle", "negative_prompt": "", "seed": 3, "steps": 2, "guidance": 7.0, "width": 64,
              "height": 64, "model": "/m", "lora": None, "lora_sha256": None, "fused": False}
    save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", fields)
    text = Image.open(tmp_path / "a.png").text
    blob = json.loads(text["sd3tune"])
    assert blob == fields
    assert text["sd3tune:negative_prompt"] == "" and "Negative prompt: \n" in text["parameters"]  # given, empty
    assert "sd3tune:lora" not in text and "sd3tune:lora_sha256" not in text and "Lora hashes" not in text["parameters"]
    assert text["parameters"].endswith("Size: 64x64, Model: /m")


def test_alpha_over_rank_applies_once_whether_the_file_carries_its_peft_config_or_not(trained_run, tiny_model,
                                                                                     tmp_path):
    # SimpleTuner writes the peft config (lora_alpha, r) into checkpoint files only, and diffusers then scales the
    # adapter by lora_alpha / r itself: multiplying by alpha/rank again made checkpoints of an alpha != rank run
    # weaker than the same weights as the final LoRA
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(trained_run / "output" / keys.LORA_WEIGHT_NAME))
    peft = {"transformer.r": 16, "transformer.lora_alpha": 8.0, "transformer.target_modules": ["to_q", "to_k", "to_v",
                                                                                                "to_out.0"]}
    files = {"plain": {}, "stamped": {"sd3tune.lora_alpha": "8.0", "sd3tune.lora_rank": "16"},
             "checkpoint": {"lora_adapter_metadata": json.dumps(peft)},
             "both": {"sd3tune.lora_alpha": "8.0", "sd3tune.lora_rank": "16",
                      "lora_adapter_metadata": json.dumps(peft)}}
    images = {}
    for name, metadata in files.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata={"format": "pt", **metadata})
        images[name] = gen(tmp_path / name, lora=tmp_path / f"{name}.safetensors", scale=0.5 if name == "plain" else 1,
                           model=str(tiny_model), width=64, max_sequence_length=154, shift=3.0)
        assert json.loads(Image.open(images[name][0]).text["sd3tune"])["lora_adapter_weight"] == 0.5, name
    for name in ("stamped", "checkpoint", "both"):
        assert [pixels(a).tobytes() for a in images[name]] == [pixels(b).tobytes() for b in images["plain"]], name


def test_drop_t5_is_recorded_and_the_t5_length_is_the_one_used(trained_run, tmp_path):
    r = sd3tune("generate", "--lora", trained_run, "-p", PROMPT, "--steps", "2", "--drop-t5",
                "--max-sequence-length", "77", "--out", tmp_path)
    assert r.code == 0, r.err
    blob = json.loads(Image.open(r.out.split()[0]).text["sd3tune"])
    assert blob["drop_t5"] is True and blob["max_sequence_length"] == 256  # the zero padding the pipeline used
    assert "--max-sequence-length ignored with --drop-t5" in r.err and "T5 length 154" not in r.err


def test_size_defaults_to_the_runs_resolution_rounded_to_what_sd3_can_sample(tmp_path):
    from sd3tune.config.models import RunConfig
    from sd3tune.lora import LoraSource
    from sd3tune.sampling import resolve_settings

    cfg = RunConfig.model_validate({"data": {"resolution": 520, "resolution_type": "pixel"},
                                    "paths": {"output_dir": "o", "data_backend_config": "b.json"}})
    run = LoraSource(tmp_path / "lora.safetensors", cfg)
    _, s, notes = resolve_settings(GenerateOptions(prompts=["x"]), run)
    assert (s.width, s.height) == (512, 512) and any("resolution 520" in n and "512" in n for n in notes)
    _, s, _ = resolve_settings(GenerateOptions(prompts=["x"], width=640), run)
    assert (s.width, s.height) == (640, 640)  # a width alone makes a square
    with pytest.raises(Sd3tuneError, match="--width 0"):
        resolve_settings(GenerateOptions(prompts=["x"], width=0), run)


def test_what_the_lora_file_says_it_trained_with_wins_over_a_run_config_edited_since(tmp_path):
    from sd3tune.config.models import RunConfig
    from sd3tune.lora import LoraSource
    from sd3tune.sampling import resolve_settings

    edited = RunConfig.model_validate({"lora": {"rank": 16, "alpha": 32}, "timesteps": {"schedule_shift": 1.0},
                                       "data": {"resolution": 256, "resolution_type": "pixel"},
                                       "paths": {"output_dir": "o", "data_backend_config": "b.json"}})
    stamp = {"sd3tune.lora_alpha": "16.0", "sd3tune.lora_rank": "16", "sd3tune.flow_schedule_shift": "3.0",
             "sd3tune.resolution": "128", "sd3tune.resolution_type": "pixel"}
    lora = LoraSource(tmp_path / "lora.safetensors", edited, stamp)
    _, s, notes = resolve_settings(GenerateOptions(prompts=["x"]), lora)
    assert lora.alpha_over_rank == 1.0 and (s.shift, s.width, s.height) == (3.0, 128, 128)
    assert not any("alpha/rank" in n for n in notes)
    unstamped = LoraSource(tmp_path / "checkpoint.safetensors", edited, {})  # nothing in the file: the run's config
    assert unstamped.alpha_over_rank == 2.0 and unstamped.schedule_shift == 1.0 and unstamped.square_side == 256


def test_a_later_checkpoint_than_the_runs_lora_is_named(trained_run, tmp_path):
    # a resumed training interrupted past the final LoRA's step: --lora RUN sampled the older final LoRA silently
    from sd3tune.lora import resolve_lora
    from sd3tune.sampling import resolve_settings

    output = Path(shutil.copytree(trained_run / "output", tmp_path / "output"))  # 20 steps, checkpoint-10 and -20
    final = output / keys.LORA_WEIGHT_NAME
    _, _, notes = resolve_settings(GenerateOptions(prompts=["x"]), resolve_lora(final))
    assert not any("later training" in n for n in notes), notes
    shutil.copytree(output / "checkpoint-20", output / "checkpoint-24")
    _, _, notes = resolve_settings(GenerateOptions(prompts=["x"]), resolve_lora(final))
    assert f"the run's LoRA has 20 steps; checkpoint-24, from a later training that did not finish, has more " \
           f"(--lora {output / 'checkpoint-24'} samples it)" in notes, notes
    _, _, notes = resolve_settings(GenerateOptions(prompts=["x"]), resolve_lora(output / "checkpoint-20"))
    assert not any("later training" in n for n in notes), notes


def test_a_relative_model_folder_is_recorded_as_an_absolute_one(tiny_model, monkeypatch):
    from sd3tune.sampling import resolve_settings

    monkeypatch.chdir(tiny_model.parent)
    model, _, _ = resolve_settings(GenerateOptions(prompts=["x"], model=tiny_model.name), None)
    assert model == str(tiny_model.resolve())  # what PNGs record, whatever folder generate ran in


def test_prompts_file_makes_a_grid_in_one_call(trained_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# my prompts\nsd3tune-style, a robot\n\nsd3tune-style, a forest\n")
    r = sd3tune("generate", "--lora", trained_run, "--prompts-file", prompts, "-n", "2", "--steps", "2",
                "--out", tmp_path / "out")
    assert r.code == 0, r.err
    files = sorted((tmp_path / "out").glob("0*.png"))
    assert len(files) == 4 and len(r.out.split()) == 4
    assert "T5 length 154" in r.err
    grid = Image.open(tmp_path / "out" / "grid.png")  # rows: prompts, columns: seeds
    assert grid.height > grid.width / 2 and "grid:" in r.err
    # the grid's own provenance: what made its images, its rows and columns, and the file of each cell
    text = grid.text
    blob = json.loads(text["sd3tune"])
    lora = trained_run / "output" / keys.LORA_WEIGHT_NAME
    assert blob["lora"] == text["sd3tune:lora"] == str(lora.resolve())
    assert blob["lora_sha256"] == text["sd3tune:lora_sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest()
    assert blob["model"] == text["sd3tune:model"] == json.loads(Image.open(files[0]).text["sd3tune"])["model"]
    assert blob["sd3tune_version"] == text["sd3tune:sd3tune_version"] and blob["steps"] == 2
    assert blob["prompts"] == json.loads(text["sd3tune:prompts"]) == ["sd3tune-style, a robot",
                                                                      "sd3tune-style, a forest"]
    assert blob["seeds"] == [0, 1] and (blob["rows"], blob["columns"]) == ("prompt", "seed")
    assert blob["column_labels"] == ["seed 0", "seed 1"]
    assert blob["images"] == [[f.name for f in files[:2]], [f.name for f in files[2:]]]
    assert "prompt" not in blob and "seed" not in blob and "parameters" not in text  # not one image


def test_checkpoint_folder_is_accepted_as_lora(trained_run, tmp_path):
    paths = gen(tmp_path, lora=trained_run / "output" / "checkpoint-10")
    assert "checkpoint-10" in Image.open(paths[0]).text["sd3tune:lora"]


def test_existing_images_are_never_overwritten(trained_run, tmp_path):
    first = gen(tmp_path, lora=trained_run)
    second = gen(tmp_path, lora=trained_run)
    assert set(first).isdisjoint(second) and all(p.is_file() for p in first + second)


def test_user_errors(trained_run, tiny_model, tmp_path):
    from safetensors.torch import save_file
    import torch

    assert_one_line_user_error(sd3tune("generate", "--lora", tmp_path / "nope", "-p", "x"), "does not exist")
    assert_one_line_user_error(sd3tune("generate", "--lora", trained_run, "-p", "x", "--width", "100"), "--width")
    assert_one_line_user_error(sd3tune("generate", "--lora", trained_run), "no prompt")
    other = tmp_path / "other.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 1536),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(1536, 4)}, str(other))
    assert_one_line_user_error(sd3tune("generate", "--model", tiny_model, "--lora", other, "-p", "x"),
                               "width 1536")
    unet = tmp_path / "unet.safetensors"
    save_file({"unet.down_blocks.0.lora_A.weight": torch.zeros(4, 8)}, str(unet))
    assert_one_line_user_error(sd3tune("generate", "--model", tiny_model, "--lora", unet, "-p", "x"),
                               "not an SD3 transformer LoRA")
    from safetensors.torch import load_file

    lora = load_file(str(trained_run / "output" / keys.LORA_WEIGHT_NAME))
    q = "transformer.transformer_blocks.0.attn.to_q"
    for name, change, needle in (
            ("sd35", {q.replace("attn", "attn2") + ".lora_A.weight": lora[q + ".lora_A.weight"].clone()},
             "a layer this model does not have"),  # diffusers dropped such keys silently: a partial LoRA
            ("narrow", {q + ".lora_B.weight": lora[q + ".lora_B.weight"][:16].clone()}, "output width 16"),
            ("kohya", {q + ".alpha": torch.tensor(8.0)}, "not a LoRA weight")):
        file = tmp_path / f"{name}.safetensors"
        save_file({**lora, **change}, str(file))
        assert_one_line_user_error(sd3tune("generate", "--model", tiny_model, "--lora", file, "-p", "x"), needle)
    (tmp_path / "a-file").write_text("")
    (tmp_path / "list.safetensors").write_bytes(b"\x02" + bytes(7) + b"[]")
    for args, needles in ((["--out", tmp_path / "a-file"], ("--out", "is a file")),
                          (["--out", tmp_path / "a-file" / "sub"], ("--out folder", "Not a directory")),
                          (["--lora", tmp_path / "list.safetensors"], ("not a safetensors file",)),
                          (["--offload", "model"], ("--offload model needs a CUDA GPU",)),
                          (["--offload", "gpu"], ("--offload 'gpu' is not one of none, model, sequential",
                                                  "(hint: model moves each model")),
                          (["--dtype", "fp64"], ("--dtype 'fp64' is not one of", "(hint: auto is bf16")),
                          (["--model", tmp_path / "no-model"], (f"model folder {tmp_path / 'no-model'} does not exist",)),
                          (["--batch-size", "0"], ("--batch-size 0",))):
        assert_one_line_user_error(sd3tune("generate", "--model", tiny_model, "-p", "x", "--device", "cpu", *args),
                                   *needles)


def test_count_errors_say_what_to_pass(tmp_path):
    for args, needle in ((["-n", "0"], "--num-images 0 must be at least 1"), (["--steps", "0"], "--steps 0"),
                         (["--batch-size", "0"], "--batch-size 0"),
                         # 0 failed with a traceback inside diffusers; over 512 diffusers refuses (sd3tune passed it)
                         (["--max-sequence-length", "0"], "--max-sequence-length 0 must be between 1 and 512"),
                         (["--max-sequence-length", "513"], "--max-sequence-length 513 must be between 1 and 512"),
                         # beyond torch's uint64 seed: a traceback after the model had loaded
                         (["--seed", str(2 ** 64)], f"--seed {2 ** 64} is outside 0..{2 ** 64 - 1}"),
                         (["--seed", str(2 ** 64 - 1), "-n", "2"], f"(its last image's seed {2 ** 64})"),
                         (["--seed", "-1"], "--seed -1 is outside")):
        r = sd3tune("generate", "-p", "x", "--out", tmp_path, *args)
        assert_one_line_user_error(r, needle, "(hint: ")


def test_a_file_that_is_not_an_sd3_lora_is_refused_before_any_model_loads(tmp_path):
    # e.g. a CLIP model's model.safetensors: without --model, generate tried the default Hub model first and failed
    # with a misleading "cannot load stabilityai/..."; the file's keys are read from its header before any load
    from safetensors.torch import save_file
    import torch

    clip = tmp_path / "model.safetensors"
    save_file({"logit_scale": torch.zeros(())}, str(clip))
    r = sd3tune("generate", "--lora", clip, "-p", "x", "--out", tmp_path / "out",
                env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})  # no Hub either way
    assert_one_line_user_error(r, f"{clip} is not an SD3 transformer LoRA (found key 'logit_scale')")
    assert "stabilityai" not in r.err and "Retrying" not in r.err


def test_the_default_hub_model_out_of_reach_and_not_downloaded_is_one_line_before_anything_loads(tmp_path):
    # diffusers spent ~20 s (imports, a Hub request) before a paragraph of advice; the cache is checked first now
    from helpers import UNREACHABLE_HUB

    from sd3tune.defaults import SD3M

    r = sd3tune("generate", "-p", "x", "--out", tmp_path / "out",
                env={**UNREACHABLE_HUB, "HF_HUB_CACHE": str(tmp_path / "empty-cache")})
    assert_one_line_user_error(r, f"cannot load {SD3M}: it is not in the local Hugging Face cache", "127.0.0.1:9",
                               f"hf download {SD3M}", "--model PATH")
    assert "Retrying" not in r.err and not (tmp_path / "out").exists()


def test_a_hub_model_in_the_cache_generates_with_the_hub_out_of_reach(tiny_model, tmp_path):
    from helpers import UNREACHABLE_HUB, hub_cache_with

    cache = hub_cache_with(tiny_model, "sd3tune-tests/tiny-sd3", tmp_path / "hub")
    r = sd3tune("generate", "-p", PROMPT, "--model", "sd3tune-tests/tiny-sd3", "-n", "1", "--steps", "2",
                "--width", "64", "--device", "cpu", "--out", tmp_path / "out",
                env={**UNREACHABLE_HUB, "HF_HUB_CACHE": str(cache)})
    assert r.code == 0, r.err[-3000:]
    assert "Retrying" not in r.err
    (png,) = (tmp_path / "out").glob("*.png")
    assert json.loads(Image.open(png).text["sd3tune"])["model"] == "sd3tune-tests/tiny-sd3"


def test_ctrl_c_keeps_the_images_written_and_lists_them(tiny_model, tmp_path):
    # it exited 130 without a word, the progress bar's line left open; the paths only ever came at the end
    from helpers import interrupted

    out = tmp_path / "out"
    r = interrupted("generate", "--model", tiny_model, "-p", PROMPT, "-n", "10000", "--batch-size", "1", "--steps",
                    "2", "--width", "64", "--out", out, when=lambda: any(out.glob("*.png")))  # the first image
    stdout, err = r.out, r.err
    assert r.code == 130, err[-2000:]
    written = sorted(out.glob("*.png"))
    assert 0 < len(written) < 10000 and sorted(Path(line) for line in stdout.splitlines()) == written
    for png in written:  # each one whole, with its provenance
        assert json.loads(Image.open(png).text["sd3tune"])["prompt"] == PROMPT
    last = err.replace("\r", "\n").splitlines()[-1]
    assert last == f"error: interrupted: {len(written)} image{'s' if len(written) > 1 else ''} written to {out}"
    assert "Traceback" not in err


def test_a_full_disk_is_found_before_the_model_loads(tiny_model, tmp_path, monkeypatch):
    # on a full disk, generate made every image before its first write failed
    from collections import namedtuple

    import sd3tune.commands.generate as generate
    import sd3tune.fsutil as fsutil

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(fsutil.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 50_000, 50_000))
    monkeypatch.setattr(generate, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))
    out = tmp_path / "out"
    r = sd3tune("generate", "--model", tiny_model, "-p", PROMPT, "-n", "4", "--width", "256", "--out", out)
    assert_one_line_user_error(r, f"{out} has 0.0 MiB free; writing 4 images at 256x256 and their grid needs about ",
                               "nothing was generated", "fewer images")
    assert not out.exists()  # the folder it made is gone with nothing in it


def test_a_failed_write_stops_at_once_and_lists_the_images_written_before_it(tiny_model, tmp_path, monkeypatch):
    # on a full disk generate went on making images, then said only the failed file's name
    import sd3tune.commands.generate as generate

    made, real_save, real_make = [], generate.save_png, generate.make_images

    def save(image, path, fields=None):
        if "-s1." in path.name:  # the second image: the disk is full
            raise Sd3tuneError(f"cannot write {path}: No space left on device", hint="free some disk space")
        real_save(image, path, fields)

    monkeypatch.setattr(generate, "save_png", save)
    monkeypatch.setattr(generate, "make_images", lambda *a, **k: made.append(1) or real_make(*a, **k))
    out = tmp_path / "out"
    r = sd3tune("generate", "--model", tiny_model, "-p", PROMPT, "-n", "6", "--batch-size", "1", "--steps", "2",
                "--width", "64", "--out", out)
    written = sorted(out.glob("*.png"))  # the first, and any the writer had in hand after the failed one
    assert_one_line_user_error(r, "-s1.png: No space left on device",
                               f"; {len(written)} image{'s' * (len(written) > 1)} written, listed above")
    assert written and r.out.split() == [str(p) for p in written]
    assert not (out / written[0].name.replace("-s0.", "-s1.")).exists()  # no empty or partial file left
    assert len(made) <= 3  # of 6 batches: the failed write stops the making (the writer runs one batch behind)


def test_a_repeated_prompt_is_made_once_and_said(tiny_model, tmp_path):
    # -p dup -p dup made the same images twice (from a prompts file, the repeat was dropped without a word)
    prompts_file = tmp_path / "p.txt"
    prompts_file.write_text(f"{PROMPT}\na red apple\n", encoding="utf-8")
    result = run_generate(GenerateOptions(prompts=[PROMPT], prompts_file=prompts_file, model=str(tiny_model),
                                          out=tmp_path / "out", steps=2, width=64), progress=False)
    assert [i.prompt for i in result.images] == [PROMPT, "a red apple"]
    assert "1 repeated prompt left out: the same prompt at the same seeds makes the same images" in result.notes


def test_each_image_is_reported_as_soon_as_it_is_written(tiny_model, tmp_path, monkeypatch):
    # A caller (progress display, benchmark) hears of batch 1's images while batch 2 is still to be made.
    import threading

    import sd3tune.commands.generate as generate

    first_batch_written = threading.Event()
    seen: list[tuple[Path, bool]] = []
    calls = []
    real_make_images = generate.make_images

    def make_images(*args, **kwargs):
        if calls:  # the second batch waits for the writer thread to report the first batch's images
            assert first_batch_written.wait(timeout=60), "no image was reported before the last batch"
        calls.append(args[2])
        return real_make_images(*args, **kwargs)

    def on_image(item):
        seen.append((item.path, item.path.is_file()))
        if len(seen) == 2:
            first_batch_written.set()

    monkeypatch.setattr(generate, "make_images", make_images)
    opts = GenerateOptions(prompts=[PROMPT], model=str(tiny_model), out=tmp_path, steps=2, num_images=4,
                           batch_size=2, width=64, height=64)
    result = run_generate(opts, on_image=on_image, progress=False)
    assert calls == [[0, 1], [2, 3]]
    assert [p for p, _ in seen] == [i.path for i in result.images] and all(exists for _, exists in seen)


def test_compile_fast_path_fuses_the_lora_into_the_weights_without_changing_the_image(trained_run, lora_images,
                                                                                       tmp_path):
    result = run_generate(GenerateOptions(prompts=[PROMPT], out=tmp_path, steps=6, num_images=2, lora=trained_run,
                                          compile=True), progress=False)
    assert any("LoRA fused" in n for n in result.notes)
    assert any("nothing compiled on cpu" in n for n in result.notes)  # compiling only pays off on a GPU
    fused = [i.path for i in result.images]
    # the LoRA moves these images by >= 1/255 (test above); fusing it only rounds differently
    for a, b in zip(fused, lora_images):
        assert np.abs(pixels(a) - pixels(b)).mean() < 0.25
    recorded = json.loads(Image.open(fused[0]).text["sd3tune"])
    assert recorded["fused"] is True and recorded["compiled"] is False  # nothing compiled on a CPU
    assert json.loads(Image.open(lora_images[0]).text["sd3tune"])["fused"] is False


def test_compile_without_a_lora_records_nothing_fused(tiny_model, tmp_path):
    image = gen(tmp_path, model=str(tiny_model), width=64, compile=True)[0]
    recorded = json.loads(Image.open(image).text["sd3tune"])
    assert recorded["lora"] is None and recorded["fused"] is None and recorded["compiled"] is False


def test_a_relative_output_dir_is_read_from_the_run_folder(trained_run, tmp_path, monkeypatch):
    # SimpleTuner runs in the run folder, so OUTPUT_DIR='output' means RUN/output wherever sd3tune is started from
    run = tmp_path / "run"
    shutil.copytree(trained_run / "config", run / "config")
    env = run / "config" / "config.env"
    env.write_text(re.sub(r"^OUTPUT_DIR=.*$", "OUTPUT_DIR='output'", env.read_text(), flags=re.M))
    (run / "output").mkdir()
    shutil.copy(trained_run / "output" / keys.LORA_WEIGHT_NAME, run / "output" / keys.LORA_WEIGHT_NAME)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert resolve_lora(run).file == (run / "output" / keys.LORA_WEIGHT_NAME).resolve()


def test_a_run_whose_output_dir_is_elsewhere_keeps_its_training_settings(trained_run, tmp_path):
    # generate --lora RUN must still use the run's resolution, alpha/rank and shift (it fell back to 1024 px)
    run, out = tmp_path / "run", tmp_path / "outputs"
    shutil.copytree(trained_run / "config", run / "config")
    env = run / "config" / "config.env"
    env.write_text(re.sub(r"^OUTPUT_DIR=.*$", f"OUTPUT_DIR='{out}'", env.read_text(), flags=re.M))
    out.mkdir()
    shutil.copy(trained_run / "output" / keys.LORA_WEIGHT_NAME, out / keys.LORA_WEIGHT_NAME)
    lora = resolve_lora(run)
    assert lora.file == (out / keys.LORA_WEIGHT_NAME).resolve()
    assert lora.config is not None and lora.config.data.resolution == 64


def test_pngs_match_diffusers_own_pil_output_pixel_for_pixel(tiny_model, tmp_path):
    # generate converts to 8 bits on the device and copies without blocking; the pixels must not change for it
    from sd3tune.inference import load_pipeline, run_images
    from sd3tune.sampling import SamplerSettings

    written = gen(tmp_path, model=str(tiny_model), width=64, height=64, batch_size=2)
    pipe = load_pipeline(str(tiny_model))
    diffusers_pil = run_images(pipe, PROMPT, [0, 1], SamplerSettings(steps=6, width=64, height=64), output_type="pil")
    for path, image in zip(written, diffusers_pil):
        assert np.array_equal(pixels(path), np.asarray(image, dtype=np.float32))
    assert not np.array_equal(pixels(written[0]), pixels(written[1]))


def test_prompt_embeddings_are_encoded_once_per_prompt_and_give_diffusers_own_images(tiny_model, monkeypatch):
    # later batches of a prompt reuse its text embeddings; the images must be those of diffusers' own prompt path
    import torch

    from sd3tune.inference import load_pipeline, run_images
    from sd3tune.sampling import SamplerSettings

    s = SamplerSettings(steps=3, width=64, height=64, negative="blurry")
    p = load_pipeline(str(tiny_model))
    encodes = []
    real_encode = p.pipe.encode_prompt

    def encode_prompt(**kw):  # the pipeline calls it once more itself, with the embeddings given (prompt None)
        if kw.get("prompt") is not None:
            encodes.append(kw["prompt"])
        return real_encode(**kw)

    monkeypatch.setattr(p.pipe, "encode_prompt", encode_prompt)
    ours = [*run_images(p, PROMPT, [0, 1], s, output_type="np"), *run_images(p, PROMPT, [2], s, output_type="np")]
    assert encodes == [PROMPT]
    run_images(p, "another prompt", [0], s, output_type="np")
    run_images(p, PROMPT, [0], s, output_type="np")  # only the latest prompt is kept
    assert encodes == [PROMPT, "another prompt", PROMPT]
    p.set_lora_scale(1.0)  # a LoRA may reach the text encoders: encode again
    run_images(p, PROMPT, [0], s, output_type="np")
    assert len(encodes) == 4

    def diffusers_own(seeds):  # the pipeline encoding the prompt itself, in every call (same batches as ours)
        with torch.inference_mode():
            return list(real_encode.__self__(
                prompt=PROMPT, negative_prompt="blurry", num_images_per_prompt=len(seeds), num_inference_steps=3,
                guidance_scale=s.guidance, width=64, height=64, max_sequence_length=s.max_sequence_length,
                generator=[torch.Generator("cpu").manual_seed(i) for i in seeds], output_type="np").images)

    assert np.array_equal(np.stack(ours), np.stack(diffusers_own([0, 1]) + diffusers_own([2])))


def test_fp8_runs_the_fast_path_with_the_blocks_matmuls_in_e4m3(trained_run, lora_images, tmp_path):
    run = sd3tune("generate", "--lora", trained_run, "-p", PROMPT, "--steps", "6", "-n", "2", "--out", tmp_path,
                  "--fp8")
    assert run.code == 0, run.err
    assert "--fp8 implies --compile" in run.err and "LoRA fused into the transformer weights" in run.err
    layers = re.search(r"--fp8: (\d+) transformer matmuls in FP8", run.err)
    assert layers and int(layers[1]) > 0, run.err
    made = [Path(line) for line in run.out.splitlines()]  # the images, in seed order
    assert len(made) == 2 and all(path.parent == tmp_path for path in made)
    assert json.loads(Image.open(made[0]).text["sd3tune"])["fp8"] is True
    assert json.loads(Image.open(lora_images[0]).text["sd3tune"])["fp8"] is False
    diff = np.mean([np.abs(pixels(a) - pixels(b)).mean() for a, b in zip(made, lora_images)])
    assert 0 < diff < 2, diff  # the e4m3 rounding moves the pixels, a little (the LoRA moves them >= 1/255)


def test_fp8_layers_replace_the_blocks_projections_and_feed_forwards_and_stay_close(tiny_model):
    import torch
    from diffusers import SD3Transformer2DModel

    from sd3tune.fp8 import Float8Linear, quantize_blocks
    from sd3tune.inference import fuse_gelu_epilogues

    def layers(model, kind):
        return [name for block in model.transformer_blocks for name, m in block.named_modules() if type(m) is kind]

    model = SD3Transformer2DModel.from_pretrained(tiny_model / "transformer").eval()
    torch.manual_seed(0)
    args = sd3_transformer_inputs(model.config)
    modulation = [name for name in layers(model, torch.nn.Linear) if name.startswith("norm")]
    projections = len(layers(model, torch.nn.Linear)) - len(modulation)
    with torch.inference_mode():
        before = model(*args).sample
        assert quantize_blocks(model) == projections
        after = model(*args).sample
        for block in model.transformer_blocks:  # as --fp8 compiles them on a GPU
            block.compile(fullgraph=True, dynamic=False)
        compiled = model(*args).sample
    assert layers(model, torch.nn.Linear) == modulation  # the adaLN modulation stays
    assert fuse_gelu_epilogues(model) == 0  # its bf16 GELU epilogue would read the FP8 layers' weight
    assert len(layers(model, Float8Linear)) == projections
    assert {m.weight_fp8.dtype for m in model.modules() if type(m) is Float8Linear} == {torch.float8_e4m3fn}
    error = ((after - before).norm() / before.norm()).item()
    assert 0 < error < 0.02, error
    assert torch.allclose(compiled, after, atol=1e-5), (compiled - after).abs().max()


def test_fp8_is_refused_where_the_fp8_matmul_does_not_run(monkeypatch):
    import torch

    from sd3tune.errors import Sd3tuneError
    from sd3tune.fp8 import check_supported

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    for device, dtype, needle in (("mps", torch.float16, "needs a CUDA GPU"),
                                  ("cuda", torch.bfloat16, "compute capability 8.9+); NVIDIA A100-SXM4-80GB is 8.0")):
        with pytest.raises(Sd3tuneError, match=re.escape(needle)) as err:
            check_supported(device, dtype)
        assert "--fp8" in err.value.hint
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    with pytest.raises(Sd3tuneError, match="needs bf16 weights, not float16") as err:
        check_supported("cuda", torch.float16)
    assert "--dtype bf16" in err.value.hint
    check_supported("cuda", torch.bfloat16)  # an H100
    check_supported("cpu", torch.float32)


def test_fused_feed_forwards_keep_the_model_on_the_cpu_and_compute_sd3s_tanh_gelu_on_cuda(tiny_model):
    import torch
    import torch.nn.functional as F
    from diffusers import SD3Transformer2DModel
    from diffusers.models.attention import FeedForward

    from sd3tune.inference import fuse_gelu_epilogues

    model = SD3Transformer2DModel.from_pretrained(tiny_model / "transformer").eval()
    torch.manual_seed(0)
    args = sd3_transformer_inputs(model.config)
    with torch.inference_mode():
        before = model(*args).sample
        ff = sum(1 for b in model.transformer_blocks for name in ("ff", "ff_context") if getattr(b, name, None))
        assert fuse_gelu_epilogues(model) == ff > 0
        assert torch.equal(model(*args).sample, before)  # CPU tensors take diffusers' own path
    if not torch.cuda.is_available():
        return
    layer = FeedForward(64, activation_fn="gelu-approximate").cuda().eval()
    fuse_gelu_epilogues(layer)
    x = torch.randn(2, 300, 64, device="cuda") * 3
    with torch.inference_mode():
        pre = layer.net[0].proj(x)
        fused = layer.net[0](x)
        tanh, exact = F.gelu(pre, approximate="tanh"), F.gelu(pre)
    assert (fused - tanh).abs().max() < 1e-4 < (fused - exact).abs().max()  # SD3's GELU, not the exact one


def test_a_prompt_longer_than_the_text_encoders_read_gets_a_note(tiny_model, tmp_path):
    # the pipeline cuts CLIP at 77 tokens and T5 at --max-sequence-length without a word: the prompt's end is lost
    long = "a castle, " + ", ".join(["tall stone towers"] * 30)
    result = run_generate(GenerateOptions(prompts=[long, "a castle"], model=str(tiny_model), out=tmp_path, width=64,
                                          steps=1, num_images=1, max_sequence_length=77), progress=False)
    assert "1 prompt longer than the 77 tokens CLIP reads: the rest of it is cut off for CLIP" in result.notes
    assert any(n.startswith("1 prompt longer than the 77 tokens T5 reads") and "--max-sequence-length" in n
               for n in result.notes), result.notes
    short = run_generate(GenerateOptions(prompts=["a castle"], model=str(tiny_model), out=tmp_path / "short",
                                         width=64, steps=1), progress=False)
    assert not any("longer than" in n for n in short.notes), short.notes
