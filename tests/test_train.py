"""`sd3tune train` end to end: the real SimpleTuner through accelerate on the tiny SD3, on CPU."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import assert_one_line_user_error, sd3tune

from sd3tune.commands.init import run_init
from sd3tune.errors import Sd3tuneError
from sd3tune.lora import read_safetensors_header
from sd3tune.simpletuner import keys
from sd3tune.simpletuner.layout import RunPaths, checkpoint_step, checkpoints
from sd3tune.simpletuner.reader import read_run


def test_trained_lora_has_sd3_transformer_keys_and_provenance(trained_run):
    lora = trained_run / "output" / "pytorch_lora_weights.safetensors"
    meta, tensors = read_safetensors_header(lora)
    assert tensors and all(k.startswith("transformer.transformer_blocks.") for k in tensors)
    a = tensors["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]["shape"]
    b = tensors["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]["shape"]
    assert a == [16, 32] and b == [32, 16]  # rank 16 on the tiny model's 32-wide attention
    assert meta["sd3tune.lora_rank"] == "16" and meta["sd3tune.t5_max_length"] == "154"
    assert meta["sd3tune.steps"] == "20"
    manifest = json.loads((trained_run / "sd3tune.json").read_text())
    assert manifest["trainings"][-1]["status"] == "ok" and manifest["trainings"][-1]["exit_code"] == 0
    # which exact file this training made: a later training writes to the same path
    assert manifest["trainings"][-1]["lora_sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest()
    # checkpoints carry the stamp too (a copied checkpoint file samples as it trained), with their own step
    checkpoint, _ = read_safetensors_header(trained_run / "output" / "checkpoint-10" / keys.LORA_WEIGHT_NAME)
    assert checkpoint["sd3tune.steps"] == "10" and checkpoint["sd3tune.t5_max_length"] == "154"
    assert checkpoint["sd3tune.resolution"] == meta["sd3tune.resolution"] == "64"


def test_the_same_seed_trains_the_same_lora_compiled_or_eager_with_gradients_dropped_or_zeroed(
        trained_run, tiny_model, concept_data, tmp_path, monkeypatch):
    # Two settings that must not change a bit, proven by one training against the shared one (eager, dropped):
    # - zeroed gradients between steps (SimpleTuner's default) where sd3tune's default drops them; with batch
    #   prefetching this failed on the pinned SimpleTuner: its loader thread drew from the trainer's random generator
    #   in no fixed order (compat fix 7);
    # - regional compiling with aot_eager, which compiles the same ATen ops as eager (no Inductor codegen); on the
    #   pinned SimpleTuner the LoRA matched because no block ever ran compiled: the dynamo log shows whether one did.
    import dataclasses

    from safetensors.torch import load_file

    from sd3tune.commands.quickstart import tiny_init_options
    from sd3tune.commands.train import TrainOptions, run_train
    from sd3tune.config.presets import merge

    monkeypatch.setenv("TORCH_LOGS", "dynamo")  # reaches SimpleTuner (TORCH_* pass through)
    options = tiny_init_options(tmp_path / "again", concept_data, tiny_model, steps=20, checkpoint_every=10)
    run_init(dataclasses.replace(options, overrides=merge(options.overrides, {
        "optim": {"set_grads_to_none": False},
        "compile": {"backend": "aot_eager", "regional": True, "mode": "default"}})))
    result = run_train(TrainOptions(run_dir=tmp_path / "again"))
    zeroed = json.loads((tmp_path / "again" / "output" / keys.RESOLVED_CONFIG_NAME).read_text())
    dropped = json.loads((trained_run / "output" / keys.RESOLVED_CONFIG_NAME).read_text())
    assert (zeroed["set_grads_to_none"], dropped["set_grads_to_none"]) == (False, True)
    log = result.log.read_text(errors="replace")
    traced = set(re.findall(r"torchdynamo start tracing (\w+) \S*?([\w.]+\.py):\d+", log))
    assert ("forward", "attention.py") in traced, traced  # diffusers' JointTransformerBlock.forward, compiled
    assert {name for name, _ in traced} == {"forward"}  # nothing but module forwards (the blocks), no SimpleTuner code
    again, first = load_file(str(result.lora)), load_file(str(trained_run / "output" / keys.LORA_WEIGHT_NAME))
    assert again.keys() == first.keys()  # parameter names unchanged by compiling in place
    assert all(again[k].equal(first[k]) for k in first)


def test_each_run_keeps_its_own_bucket_cache_in_a_shared_image_folder(trained_run, tiny_init_options):
    # SimpleTuner fills (or puts back) a dataset's settings from the bucket cache in the image folder: a second run
    # on the same folder took the first run's crop and resolution
    image = read_run(trained_run).backends[0]
    folder = Path(image.instance_data_dir)
    assert (folder / f"aspect_ratio_bucket_indices_{image.cache_file_suffix}.json").is_file()
    run_init(tiny_init_options)
    assert read_run(tiny_init_options.run_dir).backends[0].cache_file_suffix != image.cache_file_suffix


def test_caches_are_written_uncompressed(trained_run):
    # gzip-compressed caches cost 20-35 ms of reads per 1024 px step (benchmarks/bench_cache_read.py); sd3tune turns
    # SimpleTuner's compression off with a false flag, which only works through TRAINER_EXTRA_ARGS
    resolved = json.loads((trained_run / "output" / keys.RESOLVED_CONFIG_NAME).read_text())
    assert resolved["compress_disk_cache"] is False
    caches = sorted((trained_run / "cache").rglob("*.pt"))
    assert any("vae" in p.parts for p in caches) and any("text" in p.parts for p in caches)
    assert all(p.read_bytes()[:2] != b"\x1f\x8b" for p in caches)  # no gzip magic


def test_diffusers_loads_the_lora(trained_run, tiny_model):
    import torch
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model, dtype=torch.float32)
    pipe.load_lora_weights(trained_run / "output", weight_name="pytorch_lora_weights.safetensors", adapter_name="t")
    assert "t" in pipe.get_list_adapters()["transformer"]


def test_existing_checkpoints_need_resume_and_a_finished_run_has_nothing_to_resume(trained_run):
    assert_one_line_user_error(sd3tune("train", trained_run), "checkpoint-20", "--resume")
    assert_one_line_user_error(sd3tune("train", trained_run, "--resume"), "nothing to resume",
                               "checkpoint-20 has all 20 steps")


def test_a_trained_lora_without_checkpoints_is_not_silently_replaced(tiny_init_options, trained_run):
    run_init(tiny_init_options)
    run = tiny_init_options.run_dir
    (run / "output").mkdir()
    shutil.copy(trained_run / "output" / keys.LORA_WEIGHT_NAME, run / "output")
    assert_one_line_user_error(sd3tune("train", run), "already holds a trained", "move the output folder away")


def test_a_relative_accelerate_config_is_the_users_file(tiny_init_options, tmp_path):
    run_init(tiny_init_options)
    (tmp_path / "acc.yaml").write_text("compute_environment: LOCAL_MACHINE\nnum_processes: 1\n")
    r = sd3tune("train", tiny_init_options.run_dir, "--accelerate-config", "acc.yaml", "--dry-run", cwd=tmp_path)
    assert r.code == 0, r.err
    assert f"--config_file {tmp_path / 'acc.yaml'}" in r.out  # accelerate itself runs in the run folder
    assert_one_line_user_error(sd3tune("train", tiny_init_options.run_dir, "--accelerate-config", tmp_path),
                               "is not a file")


def test_dry_run_command_trains_when_run_by_hand_and_resume_continues(tiny_init_options):
    """The printed command, pasted into a shell, trains; `train --resume` then continues from its checkpoint, as a
    terminal shows it, and says where the validation images it samples are."""
    from helpers import sd3tune_in_terminal, terminal_lines

    from sd3tune.config.presets import merge

    tiny_init_options.overrides = merge(tiny_init_options.overrides, {"validation": {
        "enabled": True, "step_interval": 2, "num_inference_steps": 2}})
    run_init(tiny_init_options)
    run = tiny_init_options.run_dir
    r = sd3tune("train", run, "--dry-run")
    assert r.code == 0 and not (run / "output").exists()
    line = r.out.strip().splitlines()[-1]
    assert "accelerate.commands.launch" in line and "CONFIG_BACKEND=env" in line
    subprocess.run(["bash", "-c", line], check=True, capture_output=True, timeout=600)
    assert (run / "output" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "output" / "checkpoint-4").is_dir()

    env_file = run / "config" / "config.env"
    env_file.write_text(env_file.read_text().replace("MAX_NUM_STEPS='4'", "MAX_NUM_STEPS='6'"))
    r = sd3tune_in_terminal("train", run, "--resume")
    assert r.code == 0, r.out[-3000:]
    lines = terminal_lines(r.out)
    # events never glued to the progress line (`...ETA 00:20SimpleTuner: saving checkpoint-15 (70 s)`); one clock
    assert not [line for line in lines if "ETA" in line and not line.startswith("step ")], lines
    assert any(line.startswith("SimpleTuner: resuming from checkpoint-4 (step 4), elapsed ") for line in lines), lines
    assert any(line.startswith("SimpleTuner: saving checkpoint-6, elapsed ") for line in lines), lines
    assert [line for line in lines if re.fullmatch(r"step 6/6  loss \d+\.\d{4}  lr 2\.00e-03  [\d.]+ s/step  "
                                                   r"elapsed \d\d:\d\d  ETA \S+", line)], lines
    folder = run / "output" / "validation_images"
    shown = f"validation images at step 6: {folder}/ (step_6_unconditional_0_128x128.png, " \
            "step_6_validation_0_128x128.png)"
    assert shown in lines or {f"validation image at step 6: {folder / name}" for name in (
        "step_6_unconditional_0_128x128.png", "step_6_validation_0_128x128.png")} <= set(lines), lines
    assert lines[-1].startswith("trained in ")
    manifest = json.loads((run / "sd3tune.json").read_text())
    assert manifest["trainings"][-1]["resume"] is True and manifest["trainings"][-1]["steps"] == 6
    assert manifest["trainings"][-1]["resumed_from"] == "checkpoint-4"
    # this training's validation images (the first training's, at steps 2 and 4, are not)
    assert (folder / "step_4_validation_0_128x128.png").is_file()
    assert manifest["trainings"][-1]["validation_images"] == [
        {"step": 6, "path": "output/validation_images/step_6_unconditional_0_128x128.png"},
        {"step": 6, "path": "output/validation_images/step_6_validation_0_128x128.png"}]
    # the LoRA says it continued a training sd3tune knows nothing of; that checkpoint is left as SimpleTuner wrote it
    meta, _ = read_safetensors_header(run / "output" / keys.LORA_WEIGHT_NAME)
    assert json.loads(meta["sd3tune.history"]) == [{"until_step": 4, "checkpoint": "checkpoint-4"}]
    assert "sd3tune.version" not in read_safetensors_header(run / "output" / "checkpoint-4" / keys.LORA_WEIGHT_NAME)[0]
    assert read_safetensors_header(run / "output" / "checkpoint-6" / keys.LORA_WEIGHT_NAME)[0]["sd3tune.steps"] == "6"


def test_a_ctrl_c_stops_cleanly_names_a_cut_save_and_the_resumed_lora_records_both_trainings(tiny_init_options):
    # One Ctrl-C'd training, then its resume with other settings. Three bugs it guards against:
    # - a Ctrl-C during a checkpoint's save (seconds for SD3 Medium) said "checkpoint-N is kept" and hinted --resume,
    #   which failed in SimpleTuner after loading every model (check --resume said ok);
    # - an interrupted training's checkpoints carried no settings, and a LoRA resumed after a settings change recorded
    #   only the last settings;
    # - the trainer was left running after the Ctrl-C.
    import dataclasses

    from helpers import interrupted

    from sd3tune.config.presets import merge

    tiny_init_options.steps = 100_000
    run_init(tiny_init_options)
    run = tiny_init_options.run_dir
    output, cut = run / "output", run / "output" / "checkpoint-99998"

    def saving() -> bool:  # once checkpoint-4 is complete: a later checkpoint as an interrupted save leaves it
        if not (output / "checkpoint-4" / ".guard").is_file():
            return False
        cut.mkdir()
        (cut / "training_state.json").touch()
        return True

    r = interrupted("train", run, when=saving)
    assert r.code == 130 and "Traceback" not in r.err, r.err[-2000:]
    assert _processes_in(run) == []  # the trainer stopped with sd3tune
    assert json.loads((run / "sd3tune.json").read_text())["trainings"][-1]["status"] == "interrupted"
    (line,) = [line for line in r.err.splitlines() if line.startswith("error:")]
    assert "training interrupted while saving checkpoint-99998, which is incomplete" in line, line
    # the Ctrl-C may also cut SimpleTuner's own save short: the hint then names that checkpoint too
    m = re.search(rf"hint: delete (?:it|them) \(rm -r ([^)]*)\), then continue from (checkpoint-\d+) with "
                  rf"`sd3tune train {re.escape(str(run))} --resume`", line)
    assert m and str(cut) in m.group(1).split() and (output / m.group(2) / ".guard").is_file(), line
    assert_one_line_user_error(sd3tune("train", run, "--resume"), "checkpoint-99998 is incomplete", "rm -r")
    for folder in m.group(1).split():  # the hint, followed
        shutil.rmtree(folder)
    assert sd3tune("check", run, "--resume").code == 0

    kept = {checkpoint_step(c): c / keys.LORA_WEIGHT_NAME for c in checkpoints(output)}
    last = max(kept)
    assert f"checkpoint-{last}" == m.group(2)
    before, _ = read_safetensors_header(kept[2])
    assert before["sd3tune.steps"] == "2" and before["sd3tune.flow_schedule_shift"] == "3.0"

    run_init(dataclasses.replace(tiny_init_options, force=True, steps=last + 2, overrides=merge(
        tiny_init_options.overrides, {"timesteps": {"schedule_shift": 2.0}})))
    r = sd3tune("check", run, "--resume")
    assert f"checkpoint-{last} trained with other settings (schedule shift 3.0 -> 2.0)" in r.out + r.err, r.out
    r = sd3tune("train", run, "--resume")
    assert r.code == 0, r.err[-3000:]
    assert f"checkpoint-{last} trained with other settings (schedule shift 3.0 -> 2.0)" in r.err  # said before launch
    meta, _ = read_safetensors_header(output / keys.LORA_WEIGHT_NAME)
    assert meta["sd3tune.flow_schedule_shift"] == "2.0" and meta["sd3tune.steps"] == str(last + 2)
    (part,) = json.loads(meta["sd3tune.history"])
    assert part["until_step"] == last and part["checkpoint"] == f"checkpoint-{last}"
    assert part["flow_schedule_shift"] == "3.0" and part["resolution"] == meta["sd3tune.resolution"]
    assert read_safetensors_header(kept[2])[0] == before  # an earlier training's checkpoint keeps its stamp


@pytest.mark.parametrize("lora_saved", [True, False])
def test_a_ctrl_c_after_the_last_step_says_the_training_is_done(tiny_init_options, monkeypatch, lora_saved,
                                                                trained_run_as_left):
    # a Ctrl-C while SimpleTuner tore down after its last step (seconds on a GPU) said "checkpoint-20 is kept" and
    # hinted --resume, which refused (nothing to resume); the final LoRA it had saved was left without its stamp.
    # The training is the shared one (20 steps, checkpoints every 10), as SimpleTuner left it: this run has its settings
    import dataclasses

    from sd3tune.commands import train
    from sd3tune.config.presets import merge

    _, as_trained, trained_log, outcome = trained_run_as_left
    tiny_init_options.steps = 20
    tiny_init_options.overrides = merge(tiny_init_options.overrides, {"checkpoints": {"step_interval": 10}})

    def ctrl_c_at_the_end(plan, log, **kwargs):  # the real training (shared), then the interrupt it would have seen
        # written now, as by this training (copy2 would keep the times of the shared one, which ran earlier)
        shutil.copytree(as_trained, tiny_init_options.run_dir / "output", dirs_exist_ok=True,
                        copy_function=shutil.copy)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_bytes(trained_log)
        if not lora_saved:  # the Ctrl-C came before SimpleTuner saved the final LoRA
            (tiny_init_options.run_dir / "output" / keys.LORA_WEIGHT_NAME).unlink()
        last = dataclasses.replace(outcome.last_progress, step=outcome.last_progress.step - 1)  # its last line unread
        return dataclasses.replace(outcome, returncode=130, interrupted=True, last_progress=last)

    monkeypatch.setattr(train, "run_plan", ctrl_c_at_the_end)
    run_init(tiny_init_options)
    run = tiny_init_options.run_dir
    with pytest.raises(Sd3tuneError) as caught:
        train.run_train(train.TrainOptions(run_dir=run))
    message, hint = caught.value.message, caught.value.hint
    assert caught.value.exit_code == 130 and message.startswith("training interrupted after its last step; ")
    assert hint == f"use it as it is, or raise MAX_NUM_STEPS and continue with `sd3tune train {run} --resume` to " \
                   "train further"
    lora = run / "output" / keys.LORA_WEIGHT_NAME
    entry = json.loads((run / "sd3tune.json").read_text())["trainings"][-1]
    assert entry["status"] == "interrupted"
    if lora_saved:
        assert message.endswith(f"its LoRA {lora} is saved")
        assert read_safetensors_header(lora)[0]["sd3tune.steps"] == "20"  # all its steps, stamped as a finished one
        assert entry["lora_sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest() and entry["steps"] == 20
    else:
        assert message.endswith("checkpoint-20 holds the trained LoRA") and "lora" not in entry
        assert read_safetensors_header(run / "output" / "checkpoint-20" / keys.LORA_WEIGHT_NAME)[0]["sd3tune.steps"] \
               == "20"


def test_uncaptioned_images_train_with_the_trigger_and_cuda_graphs_on_a_cpu_run_eagerly(tiny_init_options):
    # and a bucket smaller than the batch (one wide image, batch 2), which SimpleTuner refused: init turns on its
    # oversubscription, and SimpleTuner trains the run
    from PIL import Image

    from sd3tune.config.presets import merge

    for caption in tiny_init_options.data.glob("*.txt"):
        caption.unlink()
    Image.new("RGB", (128, 64), (200, 40, 40)).save(tiny_init_options.data / "wide.png")
    tiny_init_options.image_backend_overrides = {"crop": False}
    tiny_init_options.overrides = merge(tiny_init_options.overrides, {"data": {"minimum_image_size": None}})
    result = run_init(tiny_init_options)
    assert "1 image of 9 sits in aspect buckets smaller than the batch of 2 (128x64: 1)" in result.warnings[0].message
    assert result.check.ok, [f.render() for f in result.check.errors]
    run = tiny_init_options.run_dir
    image = read_run(run).backends[0]
    assert (image.caption_strategy, image.instance_prompt) == ("instanceprompt", tiny_init_options.trigger)
    # SimpleTuner 4.10 knows "instanceprompt", and refuses "instance_prompt"; --cuda-graphs on a CPU trains eagerly
    r = sd3tune("train", run, "--cuda-graphs")
    assert r.code == 0, r.err[-3000:]
    assert (run / "output" / keys.LORA_WEIGHT_NAME).is_file()
    assert "CUDA graphs: running eagerly: inputs on cpu" in r.err  # from the training process, shown once
    assert r.err.count("CUDA graphs:") == 1
    assert json.loads((run / "sd3tune.json").read_text())["trainings"][-1]["cuda_graphs"] is True
    log = Path(json.loads((run / "sd3tune.json").read_text())["trainings"][-1]["log"]).read_text()
    assert "Dataset oversubscription enabled: automatically padding 1 undersized bucket(s)" in log


def _run_config(run: RunPaths, **data):
    from sd3tune.config.models import RunConfig

    return RunConfig.model_validate({"paths": {"output_dir": str(run.output), "data_backend_config": str(run.backends)},
                                     "data": data})


def test_settings_changed_by_hand_or_by_init_force_make_the_cached_latents_again(tiny_init_options):
    # One run, three trainings, each after a change SimpleTuner alone would have trained through on stale caches:
    # 1. the dataset entry without its own resolution: RESOLUTION applies (sd3tune recorded and stamped its model
    #    default 1024);
    # 2. RESOLUTION changed in config.env and crop turned off in the dataset file, by hand: SimpleTuner reused every
    #    cached latent file, and took the settings recorded in its bucket cache over the dataset entry ("Expected
    #    value crop=True differs from current value=False" in its log, then it trained square crops anyway);
    # 3. `init --force` at another resolution (64 px squares again): it trained on the old latents too.
    import dataclasses

    import torch
    from PIL import Image

    for image in tiny_init_options.data.glob("*.png"):
        Image.open(image).convert("RGB").resize((96, 64)).save(image)
    run_init(tiny_init_options)  # crop to squares
    run = tiny_init_options.run_dir
    backends = run / "config" / keys.BACKENDS_FILE
    entries = json.loads(backends.read_text())
    del entries[0]["resolution"], entries[0]["resolution_type"]
    backends.write_text(json.dumps(entries))
    assert sd3tune("train", run).code == 0
    lora = run / "output" / keys.LORA_WEIGHT_NAME
    assert read_safetensors_header(lora)[0]["sd3tune.resolution"] == "64"
    latents = sorted((run / "cache" / "vae").rglob("*.pt"))
    assert latents and torch.load(latents[0]).shape[-2:] == (8, 8)  # 64 px squares

    shutil.rmtree(run / "output")
    env = run / "config" / "config.env"
    env.write_text(env.read_text().replace("RESOLUTION='64'", "RESOLUTION='128'"))
    entries[0]["crop"] = False  # by hand: keep the whole 3:2 picture
    backends.write_text(json.dumps(entries))
    r = sd3tune("train", run)
    assert r.code == 0, r.err[-3000:]
    assert "cached latents were made with other settings (resolution 64 -> 128" in r.err, r.err[-3000:]
    assert "crop True -> False" in r.err and "cleared" in r.err, r.err[-3000:]
    height, width = torch.load(latents[0]).shape[-2:]
    assert width > height  # no longer cropped square
    assert read_safetensors_header(lora)[0]["sd3tune.resolution"] == "128"

    shutil.rmtree(run / "output")
    run_init(dataclasses.replace(tiny_init_options, force=True))  # 64 px squares again
    r = sd3tune("train", run)
    assert r.code == 0, r.err[-3000:]
    assert "cached latents were made with other settings (resolution 128 -> 64" in r.err, r.err[-3000:]
    assert torch.load(latents[0]).shape[-2:] == (8, 8)


def test_latents_cached_outside_the_run_with_other_settings_are_refused(tmp_path):
    from sd3tune.simpletuner.backends import ImageBackend
    from sd3tune.simpletuner.caches import prepare_dataset_caches

    shared, run = tmp_path / "shared-latents", RunPaths(tmp_path / "run")
    backend = ImageBackend(id="art", instance_data_dir=str(tmp_path / "art"), cache_dir_vae=str(shared), resolution=64)
    cfg = _run_config(run)
    assert prepare_dataset_caches(cfg, [backend], run) == []  # records the settings
    (shared / "latent.pt").write_bytes(b"")
    assert prepare_dataset_caches(cfg, [backend], run) == []  # same settings: kept
    with pytest.raises(Sd3tuneError, match="resolution 64 -> 128"):
        prepare_dataset_caches(cfg, [backend.model_copy(update={"resolution": 128})], run)
    assert (shared / "latent.pt").exists()  # not ours to delete


def test_what_changed_since_the_last_launch_decides_which_caches_are_made_again(tmp_path, concept_data):
    from sd3tune.simpletuner.backends import ImageBackend
    from sd3tune.simpletuner.caches import bucket_files, latent_file, prepare_dataset_caches

    run, images = RunPaths(tmp_path / "run"), Path(shutil.copytree(concept_data, tmp_path / "art"))
    run.root.mkdir()
    backend = ImageBackend(id="art", instance_data_dir="../art", cache_dir_vae="cache/vae", cache_file_suffix="a-1")
    cfg = _run_config(run, resolution=64, resolution_type="pixel")  # the entry sets no resolution: RESOLUTION's
    pictures = sorted(images.glob("*.png"))
    latents = [latent_file(run.root / "cache" / "vae", images, p) for p in pictures]
    buckets = bucket_files(backend, run)
    assert buckets[0].resolve() == images / "aspect_ratio_bucket_indices_a-1.json"  # read from the run folder

    def simpletuner_ran() -> None:  # what a training leaves: a latent per image, the bucket files
        for file in latents + buckets:
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(b"x")

    assert prepare_dataset_caches(cfg, [backend], run) == []  # first launch: records what it encodes
    simpletuner_ran()
    assert prepare_dataset_caches(cfg, [backend], run) == []  # nothing changed: everything kept
    assert all(f.exists() for f in latents + buckets)

    pictures[2].write_bytes(pictures[2].read_bytes() + b"\0")  # re-exported under the same name
    notes = prepare_dataset_caches(cfg, [backend], run)
    assert len(notes) == 1 and f"1 cached latents are of images changed since ({pictures[2].name})" in notes[0]
    assert not latents[2].exists() and all(f.exists() for f in latents[:2] + latents[3:])
    assert not any(f.exists() for f in buckets)  # its size may have changed: buckets made again
    simpletuner_ran()

    notes = prepare_dataset_caches(cfg, [backend.model_copy(update={"caption_strategy": "filename"})], run)
    assert len(notes) == 1 and "bucket cache aspect_ratio_bucket_indices_a-1.json was made with other settings " \
                                "(caption_strategy 'textfile' -> 'filename')" in notes[0]
    assert all(f.exists() for f in latents) and not any(f.exists() for f in buckets)
    simpletuner_ran()

    notes = prepare_dataset_caches(_run_config(run, resolution=128, resolution_type="pixel"), [backend], run)
    assert len(notes) == 1 and f"{len(latents)} cached latents were made with other settings (resolution 64 -> 128" \
                               ", caption_strategy 'filename' -> 'textfile')" in notes[0]
    assert not any(f.exists() for f in latents + buckets)


def test_latents_are_where_simpletuner_caches_them(trained_run):
    # sd3tune clears the latent of a changed image by name: the name must be SimpleTuner's
    from sd3tune.simpletuner.caches import latent_file

    image = read_run(trained_run).backends[0]
    folder, cache = Path(image.instance_data_dir), trained_run / "cache" / "vae" / image.id
    cached = set(cache.rglob("*.pt"))
    assert cached and cached == {latent_file(cache, folder, p) for p in folder.glob("*.png")}


def test_train_says_checks_warnings_for_a_user_who_skipped_check(tiny_init_options):
    run_init(tiny_init_options)  # the tiny settings train at a learning rate check calls high
    r = sd3tune("train", tiny_init_options.run_dir, "--dry-run")
    assert r.code == 0 and re.search(r"^warning: config.env:LEARNING_RATE \(line \d+\): 0.002 is high", r.err, re.M)


def test_stray_shell_variables_do_not_leak_into_the_run(tiny_init_options):
    run_init(tiny_init_options)
    r = sd3tune("train", tiny_init_options.run_dir, "--dry-run",
                env={"MODEL_NAME": "evil/model", "OUTPUT_DIR": "/tmp/evil", "ENV": "prod", "HF_TOKEN": "hf_x",
                     "SD3TUNE_CUDA_GRAPHS": "1"})
    words = shlex.split(r.out.strip().splitlines()[-1].split(" && ", 1)[1])
    assert not any(w.startswith(("MODEL_NAME=", "OUTPUT_DIR=", "ENV=", "SD3TUNE_CUDA_GRAPHS=")) for w in words)
    assert "HF_TOKEN=$HF_TOKEN" in words and "hf_x" not in r.out  # passed on from the shell, never printed
    r = sd3tune("train", tiny_init_options.run_dir, "--dry-run", "--cuda-graphs")
    assert "SD3TUNE_CUDA_GRAPHS=1" in shlex.split(r.out.strip().splitlines()[-1].split(" && ", 1)[1])


def test_a_hub_model_trains_from_the_cache_when_the_hub_is_out_of_reach_and_fails_at_once_when_not_cached(
        tiny_init_options, tiny_model, tmp_path, monkeypatch):
    # SimpleTuner failed ~40 s after launch with "does not appear to have a file named scheduler_config.json"
    from dataclasses import replace

    from helpers import UNREACHABLE_HUB, hub_cache_with

    cache = hub_cache_with(tiny_model, "sd3tune-tests/tiny-sd3", tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    run = tiny_init_options.run_dir
    run_init(replace(tiny_init_options, model="sd3tune-tests/tiny-sd3"))
    r = sd3tune("train", run, "--dry-run", env={**UNREACHABLE_HUB, "HF_HUB_CACHE": str(tmp_path / "empty")})
    assert_one_line_user_error(r, "cannot load sd3tune-tests/tiny-sd3: it is not in the local Hugging Face cache",
                               "127.0.0.1:9", "hf download sd3tune-tests/tiny-sd3", "set MODEL_NAME to a local")
    r = sd3tune("train", run, "--dry-run", env={**UNREACHABLE_HUB, "HF_HUB_CACHE": str(cache)})
    assert "HF_HUB_OFFLINE=1" in shlex.split(r.out.strip().splitlines()[-1].split(" && ", 1)[1])  # cache only
    r = sd3tune("train", run, env={**UNREACHABLE_HUB, "HF_HUB_CACHE": str(cache)})
    assert r.code == 0, r.err[-3000:]
    assert ("note: no GPU is visible (CUDA or MPS): SimpleTuner trains on the CPU" in r.err) == (not _gpu_here())
    assert "Retrying" not in (run / "logs").joinpath(json.loads((run / "sd3tune.json").read_text())
                                                     ["trainings"][-1]["log"]).read_text()
    assert read_safetensors_header(run / "output" / keys.LORA_WEIGHT_NAME)[0]["sd3tune.base_model"] == \
        "sd3tune-tests/tiny-sd3"


def _gpu_here() -> bool:
    import torch

    return torch.cuda.is_available() or torch.backends.mps.is_available()


def test_more_gpus_than_the_machine_has_are_refused_before_the_launch(tiny_init_options, monkeypatch):
    # rank 1 would train on a cuda:1 that is not there; without any GPU, --gpus 2 runs 2 CPU processes (allowed)
    import sd3tune.commands.train as train
    from sd3tune.commands.train import TrainOptions, run_train

    run_init(tiny_init_options)
    said: list[str] = []
    monkeypatch.setattr(train, "visible_gpus", lambda: ("cuda", 1))
    with pytest.raises(Sd3tuneError) as info:
        run_train(TrainOptions(run_dir=tiny_init_options.run_dir, gpus=2), on_status=said.append)
    assert info.value.message == "--gpus 2 but only 1 GPU (cuda) visible on this machine"
    assert info.value.hint.startswith("drop --gpus (CUDA_VISIBLE_DEVICES limits what is visible)")
    assert not list((tiny_init_options.run_dir / "logs").glob("train-*.log"))  # nothing launched
    monkeypatch.setattr(train, "visible_gpus", lambda: ("cuda", 3))
    with pytest.raises(Sd3tuneError, match="--gpus 4 but only 3 GPUs") as info:
        run_train(TrainOptions(run_dir=tiny_init_options.run_dir, gpus=4), on_status=said.append)
    assert info.value.hint.startswith("pass --gpus 3")
    result = run_train(TrainOptions(run_dir=tiny_init_options.run_dir, gpus=4, dry_run=True))  # maybe elsewhere
    assert "--multi_gpu" in result.plan.argv


def test_bad_process_counts_and_accelerate_files_are_one_line_each_before_any_launch(tiny_init_options, tmp_path,
                                                                                    monkeypatch):
    import sd3tune.commands.train as train

    run_init(tiny_init_options)
    run = tiny_init_options.run_dir
    assert_one_line_user_error(sd3tune("train", run, "--gpus", "0"), "--gpus 0 must be at least 1")
    assert_one_line_user_error(sd3tune("check", run, "--gpus", "0"), "--gpus 0 must be at least 1")
    broken = tmp_path / "broken.yaml"
    broken.write_text("distributed_type: MULTI_GPU\nnum_processes: [2\n")
    for command in ("train", "check"):
        assert_one_line_user_error(sd3tune(command, run, "--accelerate-config", broken), "broken.yaml does not parse")
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text("distributed_type: MULTI_GPU\nnum_machines: 2\nnum_processes: 4\nmain_process_ip: 10.0.0.1\n")
    assert_one_line_user_error(sd3tune("train", run, "--accelerate-config", nodes, "--", "--num_machines", "1"),
                               "nodes.yaml names 2 machines but the launch says --num_machines 1")
    monkeypatch.setattr(train, "visible_gpus", lambda: ("cuda", 1))  # the file's 2 processes per machine: 1 GPU here
    with pytest.raises(Sd3tuneError, match=r"nodes.yaml starts 2 processes here but only 1 GPU \(cuda\) visible"):
        train.run_train(train.TrainOptions(run_dir=run, accelerate_config=nodes))
    assert not (run / "logs").exists() and not (run / "output").exists()  # nothing launched


def test_the_launch_message_and_record_count_the_accelerate_files_processes(tiny_init_options, monkeypatch):
    # `--accelerate-config multi_gpu.yaml` said "launching SimpleTuner (1 process)" although the file starts 2
    import sd3tune.commands.train as train
    from sd3tune.simpletuner.launch import RunOutcome

    run_init(tiny_init_options)
    config = Path(__file__).parents[1] / "configs" / "accelerate" / "multi_gpu.yaml"
    monkeypatch.setattr(train, "run_plan", lambda plan, log, **kw: RunOutcome(1, False, None, ["ValueError: stop"]))
    said: list[str] = []
    with pytest.raises(Sd3tuneError, match="ValueError: stop"):
        train.run_train(train.TrainOptions(run_dir=tiny_init_options.run_dir, accelerate_config=config),
                        on_status=said.append)
    assert any(line.startswith("launching SimpleTuner (2 processes, effective batch 4)") for line in said), said
    entry = json.loads((tiny_init_options.run_dir / "sd3tune.json").read_text())["trainings"][-1]
    assert (entry["processes"], entry["machines"], entry["effective_batch"]) == (2, 1, 4)


def test_check_counts_every_process_of_the_job(tiny_init_options):
    # 8 images in one bucket, batch 2: 2 processes -> effective batch 4, 2 steps an epoch; 5 -> 10 > 8: no batch
    run_init(tiny_init_options)
    run = tiny_init_options.run_dir
    r = sd3tune("check", run, "--gpus", "2", "--json")
    summary = json.loads(r.out)["summary"]
    assert (summary["processes"], summary["effective_batch_size"], summary["steps_per_epoch"]) == (2, 4, 2)
    r = sd3tune("check", run, "--gpus", "5")
    assert r.code == 2 and "effective batch 10 (TRAIN_BATCH_SIZE=2 x 5 processes) is larger than aspect bucket" in r.out
    assert_one_line_user_error(sd3tune("train", run, "--gpus", "5", "--dry-run"), "effective batch 10")


def test_cuda_graphs_refuse_a_run_they_could_never_replay(tiny_init_options):
    import dataclasses

    from sd3tune.config.presets import merge

    for section, override, needle in (("compile", {"backend": "inductor"}, "compile.backend is inductor"),
                                      ("precision", {"gradient_checkpointing": True}, "gradient checkpointing is on")):
        options = dataclasses.replace(tiny_init_options, run_dir=tiny_init_options.run_dir.with_name(section),
                                      overrides=merge(tiny_init_options.overrides, {section: override}))
        run_init(options)
        assert_one_line_user_error(sd3tune("train", options.run_dir, "--cuda-graphs"), "--cuda-graphs", needle)
        assert sd3tune("train", options.run_dir, "--dry-run").code == 0  # fine without it


def test_failing_simpletuner_exit_code_and_log_are_reported(tiny_init_options, tiny_model, tmp_path):
    """A model whose weights are garbage passes the preflight (structure is fine) and fails inside SimpleTuner."""
    broken = Path(shutil.copytree(tiny_model, tmp_path / "broken-model"))
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    tiny_init_options.model = str(broken)
    run_init(tiny_init_options)
    run = tiny_init_options.run_dir
    r = sd3tune("train", run)
    assert r.code not in (0, 2), r.err[-2000:]  # SimpleTuner's failure, not a preflight error
    error_lines = [line for line in r.err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "SimpleTuner exited with code 1: OSError" in error_lines[0]
    assert "see the full log" in error_lines[0]
    logs = list((run / "logs").glob("train-*.log"))
    assert logs and logs[0].stat().st_size > 0
    manifest = json.loads((run / "sd3tune.json").read_text())
    assert manifest["trainings"][-1]["status"] == "failed"


def _processes_in(folder: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if Path(proc / "cwd").resolve() == folder.resolve():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "(gone)"
