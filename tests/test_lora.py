"""sd3tune.lora on small safetensors files: the header, the stamp, the history of a resumed training, which file a
folder names, and refusing files that are no SD3 LoRA. No model loads, nothing trains."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sd3tune.errors import Sd3tuneError
from sd3tune.lora import (HISTORY_KEY, LORA_ADAPTER_METADATA, LoraSource, at_step, changed_settings,
                          check_lora_fits, check_lora_keys, checkpoint_loras, latest_lora_in, lora_settings,
                          read_safetensors_header, resolve_lora, resumed_history, safetensors_metadata, same_tensors,
                          stamp_checkpoints, stamp_lora, stamped, trained_otherwise, training_stamp)
from sd3tune.simpletuner import keys

Q_A = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
Q_B = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"
SETTINGS = {"sd3tune.flow_schedule_shift": "3.0", "sd3tune.resolution": "64", "sd3tune.lora_rank": "4",
            "sd3tune.lora_alpha": "4.0"}


def lora_file(path: Path, value: float = 1.0, metadata: dict[str, str] | None = None, rank: int = 4,
              width: int = 32) -> Path:
    """A two-tensor SD3 transformer LoRA of ``rank`` for a ``width``-wide to_q, every weight ``value``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({Q_A: torch.full((rank, width), value), Q_B: torch.full((width, rank), value)}, str(path),
              metadata=metadata)
    return path


def checkpoint(output: Path, step: int, value: float = 1.0, metadata: dict[str, str] | None = None) -> Path:
    return lora_file(output / f"checkpoint-{step}" / keys.LORA_WEIGHT_NAME, value, metadata)


def run_config(**sections):
    from sd3tune.config.models import RunConfig

    return RunConfig.model_validate({"paths": {"output_dir": "o", "data_backend_config": "b.json"}, **sections})


# ----------------------------------------------------------------------------------------------- the header


def test_the_header_is_read_without_the_tensors(tmp_path):
    file = lora_file(tmp_path / "l.safetensors", metadata={"sd3tune.steps": "10"})
    metadata, tensors = read_safetensors_header(file)
    assert metadata == {"sd3tune.steps": "10"}
    assert set(tensors) == {Q_A, Q_B} and tensors[Q_A]["shape"] == [4, 32] and tensors[Q_A]["dtype"] == "F32"
    assert safetensors_metadata(file) == {"sd3tune.steps": "10"}
    assert read_safetensors_header(lora_file(tmp_path / "bare.safetensors"))[0] == {}  # no metadata at all


@pytest.mark.parametrize("content", [b"", b"short", (10 ** 9).to_bytes(8, "little") + b"{}",
                                     (5).to_bytes(8, "little") + b"nojs!", (2).to_bytes(8, "little") + b"[]",
                                     (25).to_bytes(8, "little") + b'{"__metadata__": [1, 2]}'],
                         ids=["empty", "short", "huge-header", "not-json", "not-an-object", "metadata-not-an-object"])
def test_a_file_that_is_not_safetensors_is_one_error_and_no_stamp(tmp_path, content):
    file = tmp_path / "x.safetensors"
    file.write_bytes(content)
    with pytest.raises(Sd3tuneError) as info:
        read_safetensors_header(file)
    assert info.value.message == f"{file} is not a safetensors file"
    assert info.value.hint == "pass a .safetensors LoRA"
    assert safetensors_metadata(file) is None
    assert safetensors_metadata(tmp_path / "missing.safetensors") is None
    assert safetensors_metadata(tmp_path) is None  # a folder


def test_same_tensors_ignores_metadata_and_order_and_reads_no_further_than_a_difference(tmp_path):
    a = lora_file(tmp_path / "a.safetensors", metadata={"sd3tune.steps": "20"})
    b = tmp_path / "b.safetensors"
    save_file({Q_B: torch.ones(32, 4), Q_A: torch.ones(4, 32)}, str(b), metadata={LORA_ADAPTER_METADATA: "{}"})
    assert same_tensors(a, b) and same_tensors(b, a)
    assert not same_tensors(a, lora_file(tmp_path / "c.safetensors", value=2.0))
    assert not same_tensors(a, lora_file(tmp_path / "rank8.safetensors", rank=8))
    assert not same_tensors(a, tmp_path / "missing.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(a.read_bytes()[:-10])  # a save cut short: the header promises bytes that are not there
    assert not same_tensors(a, cut)


# ----------------------------------------------------------------------------------------------- refusing files


def test_only_diffusers_format_sd3_transformer_loras_pass_the_key_check(tmp_path):
    file = tmp_path / "f.safetensors"
    check_lora_keys(file, {Q_A: {}, Q_B: {}})
    with pytest.raises(Sd3tuneError) as info:
        check_lora_keys(file, {"logit_scale": {}})
    assert info.value.message == f"{file} is not an SD3 transformer LoRA (found key 'logit_scale')"
    assert info.value.hint == "use a LoRA trained for SD3 with sd3tune/SimpleTuner"
    with pytest.raises(Sd3tuneError, match="found key 'no tensors'"):
        check_lora_keys(file, {})
    kohya = "transformer.transformer_blocks.0.attn.to_q.lora_down.weight"
    with pytest.raises(Sd3tuneError) as info:
        check_lora_keys(file, {kohya: {}})
    assert info.value.message == f"{file} has {kohya!r}, which is not a LoRA weight of the diffusers format"


class _Attention(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.to_q = torch.nn.Linear(width, width)


class _Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = _Attention(width)


class _Transformer(torch.nn.Module):
    """What check_lora_fits reads of an SD3 transformer: its config's num_layers and its layers' widths."""

    def __init__(self, layers: int = 1, width: int = 32) -> None:
        super().__init__()
        self.config = {"num_layers": layers}
        self.transformer_blocks = torch.nn.ModuleList([_Block(width) for _ in range(layers)])


def test_a_lora_for_another_model_is_refused_by_its_blocks_layers_and_widths(tmp_path):
    another = "the LoRA was trained for another model; pass the right --model"
    check_lora_fits(lora_file(tmp_path / "ok.safetensors"), _Transformer())
    deep = tmp_path / "deep.safetensors"
    save_file({Q_A.replace(".0.", ".3."): torch.ones(4, 32)}, str(deep))
    with pytest.raises(Sd3tuneError) as info:
        check_lora_fits(deep, _Transformer(layers=2))
    assert (info.value.message, info.value.hint) == (f"{deep} has block 3 but this model has 2 blocks", another)
    other = tmp_path / "other.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.ones(4, 32)}, str(other))
    with pytest.raises(Sd3tuneError) as info:
        check_lora_fits(other, _Transformer())
    assert info.value.message == (f"{other} has a LoRA for transformer_blocks.0.attn.to_k, a layer this model does "
                                  "not have")
    wide = lora_file(tmp_path / "wide.safetensors", width=48)
    with pytest.raises(Sd3tuneError) as info:
        check_lora_fits(wide, _Transformer())
    assert info.value.message == (f"{wide} was trained for a layer transformer_blocks.0.attn.to_q with input width 48; "
                                  "this model's has 32")


# ----------------------------------------------------------------------------------------------- finding the file


def test_the_final_lora_is_the_latest_else_the_checkpoint_of_the_most_steps(tmp_path):
    output = tmp_path / "output"
    assert latest_lora_in(output) is None and checkpoint_loras(output) == []
    for step in (2, 10, 4):
        checkpoint(output, step)
    (output / "checkpoint-12").mkdir()  # cut short before its LoRA: not a candidate
    (output / "checkpoint-x").mkdir()
    assert [f.parent.name for f in checkpoint_loras(output)] == ["checkpoint-2", "checkpoint-4", "checkpoint-10"]
    assert latest_lora_in(output) == output / "checkpoint-10" / keys.LORA_WEIGHT_NAME
    final = lora_file(output / keys.LORA_WEIGHT_NAME)
    assert latest_lora_in(output) == final


def test_a_lora_outside_any_run_resolves_from_its_file_or_folder(tmp_path):
    file = lora_file(tmp_path / "loras" / "mine.safetensors", metadata=SETTINGS)
    source = resolve_lora(file)
    assert source == LoraSource(file.resolve(), None, SETTINGS)
    assert source.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
    output = tmp_path / "output"
    checkpoint(output, 4)
    assert resolve_lora(output).file == (output / "checkpoint-4" / keys.LORA_WEIGHT_NAME).resolve()
    assert resolve_lora(output / "checkpoint-4").file == (output / "checkpoint-4" / keys.LORA_WEIGHT_NAME).resolve()


def test_resolving_says_what_is_missing(tmp_path):
    with pytest.raises(Sd3tuneError) as info:
        resolve_lora(tmp_path / "nowhere")
    assert info.value.message == f"LoRA {tmp_path / 'nowhere'} does not exist"
    assert info.value.hint == "pass a run folder, a checkpoint folder or a .safetensors file"
    with pytest.raises(Sd3tuneError) as info:
        resolve_lora(tmp_path)
    assert info.value.message == f"no {keys.LORA_WEIGHT_NAME} under {tmp_path}"
    assert info.value.hint == "train first (`sd3tune train RUN_DIR`), or pass the .safetensors file"
    clip = tmp_path / "model.safetensors"
    save_file({"logit_scale": torch.zeros(())}, str(clip))
    with pytest.raises(Sd3tuneError, match="is not an SD3 transformer LoRA"):
        resolve_lora(clip)


def test_a_run_folder_names_its_output_dirs_lora_with_the_runs_settings(tiny_init_options):
    from sd3tune.commands.init import run_init

    run_init(tiny_init_options)
    run = tiny_init_options.run_dir
    with pytest.raises(Sd3tuneError) as info:
        resolve_lora(run)
    assert info.value.message == f"no {keys.LORA_WEIGHT_NAME} under {run / 'output'}: the run is not trained yet"
    assert info.value.hint == f"train it first: `sd3tune train {run}`"
    checkpoint(run / "output", 2)
    source = resolve_lora(run)
    assert source.file == (run / "output" / "checkpoint-2" / keys.LORA_WEIGHT_NAME).resolve()
    assert source.config is not None and source.config.model.name_or_path == tiny_init_options.model
    assert source.base_model == tiny_init_options.model  # unstamped: from the run's config


# ----------------------------------------------------------------------------------------------- what trained it


def test_the_file_says_how_it_trained_before_the_run_config_does(tmp_path):
    cfg = run_config(lora={"rank": 16, "alpha": 32}, timesteps={"schedule_shift": 1.0},
                     data={"resolution": 256, "resolution_type": "pixel"})
    file = tmp_path / "l.safetensors"
    assert LoraSource(file).alpha_over_rank == 1.0  # nothing says: as diffusers applies it
    assert LoraSource(file, cfg).alpha_over_rank == 2.0
    peft = {LORA_ADAPTER_METADATA: json.dumps({"transformer.lora_alpha": 8, "transformer.r": 4})}  # a checkpoint's
    assert LoraSource(file, cfg, peft).alpha_over_rank == 2.0
    assert LoraSource(file, cfg, {LORA_ADAPTER_METADATA: json.dumps({"transformer.lora_alpha": 4, "transformer.r": 4})
                                  }).alpha_over_rank == 1.0
    assert LoraSource(file, cfg, {LORA_ADAPTER_METADATA: "not json"}).alpha_over_rank == 2.0  # the config then
    assert LoraSource(file, cfg, {**peft, "sd3tune.lora_alpha": "3.0", "sd3tune.lora_rank": "4"}).alpha_over_rank == 0.75
    area = LoraSource(file, cfg, {"sd3tune.resolution": "1.0", "sd3tune.resolution_type": "area"})
    assert area.square_side is None and LoraSource(file, cfg).square_side == 256
    assert LoraSource(file, None, {"sd3tune.resolution": "128"}).square_side == 128
    assert LoraSource(file).square_side is None and LoraSource(file).schedule_shift is None
    assert LoraSource(file, cfg, {"sd3tune.flow_schedule_shift": "3.0"}).schedule_shift == 3.0


def test_a_later_checkpoint_beside_the_final_lora_is_found(tmp_path):
    output = tmp_path / "output"
    final = LoraSource(lora_file(output / keys.LORA_WEIGHT_NAME), metadata={"sd3tune.steps": "20"})
    checkpoint(output, 20)
    assert final.later_checkpoint is None
    later = checkpoint(output, 24)
    assert final.later_checkpoint == later
    assert LoraSource(later, metadata={"sd3tune.steps": "24"}).later_checkpoint is None  # a checkpoint itself
    assert LoraSource(final.file).later_checkpoint is None  # unstamped: its steps unknown


# ----------------------------------------------------------------------------------------------- the stamp


def test_the_stamp_records_the_training_settings_and_a_resumed_trainings_history(tmp_path):
    from sd3tune import __version__

    cfg = run_config(lora={"rank": 8, "alpha": 4}, timesteps={"schedule_shift": 3.0},
                     data={"resolution": 128, "resolution_type": "pixel"})
    settings = lora_settings(cfg, [])
    assert settings["sd3tune.lora_rank"] == "8" and settings["sd3tune.lora_alpha"] == "4.0"
    assert settings["sd3tune.resolution"] == "128" and settings["sd3tune.flow_schedule_shift"] == "3.0"
    assert settings["sd3tune.t5_max_length"] == str(keys.SD3_T5_MAX_LENGTH)
    stamp = training_stamp(cfg, [], tmp_path / "run", None)
    assert stamp == {"sd3tune.version": __version__, **settings, "sd3tune.run_dir": str((tmp_path / "run").resolve())}
    earlier = checkpoint(tmp_path / "output", 6, metadata=at_step({**stamp, "sd3tune.resolution": "64"}, 6)).parent
    resumed = training_stamp(cfg, [], tmp_path / "run", earlier)
    (part,) = json.loads(resumed[HISTORY_KEY])
    assert part["until_step"] == 6 and part["checkpoint"] == "checkpoint-6" and part["resolution"] == "64"
    assert part["lora_rank"] == "8" and "trained_at" in part and "version" not in part and "run_dir" not in part


def test_the_history_grows_by_one_part_per_resume_oldest_first(tmp_path):
    first = json.loads(resumed_history(tmp_path / "checkpoint-4", {}))  # a checkpoint sd3tune did not stamp
    assert first == [{"until_step": 4, "checkpoint": "checkpoint-4"}]
    stamp = {**SETTINGS, HISTORY_KEY: json.dumps(first), "sd3tune.trained_at": "2026-01-01T00:00:00+00:00"}
    second = json.loads(resumed_history(tmp_path / "checkpoint-8", stamp))
    assert second == [first[0], {"until_step": 8, "checkpoint": "checkpoint-8", "flow_schedule_shift": "3.0",
                                 "resolution": "64", "lora_rank": "4", "lora_alpha": "4.0",
                                 "trained_at": "2026-01-01T00:00:00+00:00"}]
    for broken in ("not json", json.dumps({"a": 1})):  # a hand-edited history starts afresh
        assert len(json.loads(resumed_history(tmp_path / "checkpoint-8", {HISTORY_KEY: broken}))) == 1


def test_stamping_rewrites_the_header_and_keeps_the_tensors_and_metadata(tmp_path):
    file = lora_file(tmp_path / "l.safetensors", value=0.5, metadata={LORA_ADAPTER_METADATA: "{}"})
    before = file.read_bytes()
    stamp_lora(file, at_step(SETTINGS, 20))
    metadata, _ = read_safetensors_header(file)
    assert metadata[LORA_ADAPTER_METADATA] == "{}" and metadata["sd3tune.steps"] == "20"
    assert metadata["sd3tune.resolution"] == "64" and metadata["sd3tune.trained_at"]
    assert file.read_bytes() != before and same_tensors(file, lora_file(tmp_path / "same.safetensors", value=0.5))
    assert at_step({}, None)["sd3tune.steps"] == "None"  # as the manifest records an unknown step count


def test_stamping_gives_a_file_without_a_peft_config_the_one_diffusers_scales_it_by(tmp_path):
    """The final LoRA SimpleTuner writes has no lora_adapter_metadata (its checkpoints do): the stamp adds one that
    peft reads as rank and alpha, targeting exactly the file's layers, so diffusers applies alpha / rank itself."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    file = lora_file(tmp_path / "l.safetensors")
    stamp_lora(file, {**SETTINGS, "sd3tune.lora_alpha": "1.0"})
    raw = json.loads(read_safetensors_header(file)[0][LORA_ADAPTER_METADATA])
    config = LoraConfig(**{k.removeprefix("transformer."): v for k, v in raw.items()})  # as diffusers 0.42 builds it
    assert (config.r, config.lora_alpha) == (4, 1.0)
    assert check_target_module_exists(config, "transformer_blocks.0.attn.to_q")
    assert not check_target_module_exists(config, "transformer_blocks.1.attn.to_q")  # not in the file: no adapter


def test_a_file_cut_short_after_its_header_is_not_stamped(tmp_path):
    file = lora_file(tmp_path / "l.safetensors")
    file.write_bytes(file.read_bytes()[:-10])
    cut = file.read_bytes()
    assert stamped(file, SETTINGS) is False and file.read_bytes() == cut
    assert stamped(lora_file(tmp_path / "ok.safetensors"), SETTINGS) is True


def test_only_this_trainings_complete_checkpoints_are_stamped_with_their_step(tmp_path):
    output = tmp_path / "output"
    old = checkpoint(output, 2, metadata={"sd3tune.steps": "2", "sd3tune.resolution": "32"})  # an earlier training's
    new = checkpoint(output, 4)
    cut = checkpoint(output, 6)
    cut.write_bytes(b"\0" * 4)
    (output / "checkpoint-8").mkdir()  # no LoRA in it
    stamp_checkpoints(output, SETTINGS, after_step=2)
    assert read_safetensors_header(old)[0] == {"sd3tune.steps": "2", "sd3tune.resolution": "32"}
    metadata = read_safetensors_header(new)[0]
    assert metadata.pop("sd3tune.trained_at") and metadata.pop(LORA_ADAPTER_METADATA)
    assert metadata == {**SETTINGS, "sd3tune.steps": "4"}
    assert cut.read_bytes() == b"\0" * 4


def test_changed_settings_name_what_a_stamp_records_otherwise(tmp_path):
    now = {**SETTINGS, "sd3tune.resolution": "128", "sd3tune.flow_schedule_shift": "1.0", "sd3tune.steps": "8"}
    assert changed_settings(SETTINGS, now) == ["schedule shift 3.0 -> 1.0", "resolution 64 -> 128"]
    assert changed_settings({}, now) == []  # an unstamped checkpoint: nothing to compare
    assert changed_settings({**SETTINGS, "sd3tune.steps": "2"}, now) == changed_settings(SETTINGS, now)  # no setting
    file = lora_file(tmp_path / "ckpt.safetensors", metadata=SETTINGS)
    assert trained_otherwise("checkpoint-4", file, now) == [
        "checkpoint-4 trained with other settings than the LoRA (schedule shift 3.0 -> 1.0, resolution 64 -> 128): "
        "it is sampled with the LoRA's, as every model here"]
    assert trained_otherwise("checkpoint-4", file, SETTINGS) == []
    assert trained_otherwise("checkpoint-4", tmp_path / "missing.safetensors", now) == []


def test_importing_lora_and_hub_loads_only_the_standard_library():
    # `sd3tune check` reads stamps: neither module may pull in torch, safetensors, pydantic or huggingface_hub
    code = ("import sys, sd3tune.lora, sd3tune.hub; print(sorted(m for m in ('torch', 'safetensors', 'pydantic', "
            "'huggingface_hub', 'httpx', 'sd3tune.config', 'sd3tune.simpletuner') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
