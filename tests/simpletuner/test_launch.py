"""The launch command as data: argv and environment for every option."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from sd3tune.errors import Sd3tuneError
from sd3tune.simpletuner.compat import SITE_DIR
from sd3tune.simpletuner.launch import build_launch, parse_progress, train_script

ENV = {"PATH": "/usr/bin", "HOME": "/home/u", "HF_TOKEN": "hf_secret", "WANDB_API_KEY": "wb",
       "MODEL_NAME": "stray/model", "OUTPUT_DIR": "/stray", "ENV": "prod", "TRAINER_EXTRA_ARGS": "--x",
       "TORCH_NUM_THREADS": "3", "CONFIG_PATH": "/elsewhere", "NCCL_DEBUG": "INFO", "RANDOM_VAR": "1",
       "TORCHINDUCTOR_CACHE_DIR": "/cache/inductor", "TRITON_CACHE_DIR": "/cache/triton", "TORCH_LOGS": "recompiles"}


def plan(**kw):
    args = dict(run_dir=Path("/runs/a"), config_format="env", mixed_precision="bf16", environ=ENV, python="/py")
    args.update(kw)
    return build_launch(**args)


def test_single_gpu_default_argv():
    p = plan()
    assert p.argv == ["/py", "-m", "accelerate.commands.launch", "--num_processes=1", "--num_machines=1",
                      "--mixed_precision=bf16", "--dynamo_backend=no", str(train_script())]
    assert p.cwd == Path("/runs/a")
    assert train_script().name == "train.py" and train_script().is_file()


def test_multi_gpu_adds_processes_and_multi_gpu():
    assert plan(gpus=4).argv[3:8] == ["--num_processes=4", "--num_machines=1", "--mixed_precision=bf16",
                                      "--dynamo_backend=no", "--multi_gpu"]


def test_accelerate_config_file_and_extra_args_pass_through():
    p = plan(accelerate_config=Path("/cfg/fsdp.yaml"), gpus=8, extra_accelerate_args=["--main_process_port", "29501"])
    assert p.argv[3:] == ["--config_file", "/cfg/fsdp.yaml", "--num_processes=8", "--main_process_port", "29501",
                          str(train_script())]


def test_zero_gpus_is_a_user_error():
    with pytest.raises(Sd3tuneError):
        plan(gpus=0)


def test_environment_is_scrubbed_of_simpletuner_keys_but_keeps_credentials():
    env = plan(config_format="json").env
    for stray in ("MODEL_NAME", "OUTPUT_DIR", "ENV", "TRAINER_EXTRA_ARGS", "TORCH_NUM_THREADS", "CONFIG_PATH",
                  "RANDOM_VAR"):
        assert stray not in env
    assert env["HF_TOKEN"] == "hf_secret" and env["WANDB_API_KEY"] == "wb" and env["NCCL_DEBUG"] == "INFO"
    # the compiler's own settings reach the child (TORCH_NUM_THREADS above is SimpleTuner's key and stays out)
    assert (env["TORCHINDUCTOR_CACHE_DIR"], env["TRITON_CACHE_DIR"], env["TORCH_LOGS"]) == (
        "/cache/inductor", "/cache/triton", "recompiles")
    assert env["CONFIG_BACKEND"] == "json"
    assert env["PYTHONPATH"] == str(SITE_DIR) and (SITE_DIR / "sitecustomize.py").is_file()


def test_users_pythonpath_is_kept_after_the_compat_folder():
    # packages installed with `pip install --target DIR` (PYTHONPATH=DIR) must stay importable by SimpleTuner
    env = build_launch(Path("/runs/a"), "env", "bf16", environ={"PYTHONPATH": f"/opt/site{os.pathsep}{os.pathsep}/src"},
                       python="/py").env
    assert env["PYTHONPATH"].split(os.pathsep) == [str(SITE_DIR), "/opt/site", "/src"]


def test_shell_line_is_copy_pasteable():
    line = plan().shell()
    assert line.startswith("cd /runs/a && env -i ")
    words = shlex.split(line.split(" && ", 1)[1])
    assert "CONFIG_BACKEND=env" in words and words[-1] == str(train_script())


@pytest.mark.parametrize("line, step, total, loss, rate", [
    ("Epoch 1/1, Steps:  25%|██▌       | 1/4 [00:09<00:29,  9.82s/it, lr=0.001, step_loss=3.8]", 1, 4, 3.8, 9.82),
    ("\x1b[0mEpoch 2/3, Steps: 100%|██████████| 40/40 [00:10<00:00,  4.00it/s, lr=1e-4, step_loss=0.12]",
     40, 40, 0.12, 0.25),
    ("Epoch 1/1, Steps:   0%|          | 0/4 [00:00<?, ?it/s]", 0, 4, None, None),
])
def test_progress_lines_are_parsed(line, step, total, loss, rate):
    p = parse_progress(line)
    assert p is not None and (p.step, p.total, p.loss) == (step, total, loss)
    assert (p.seconds_per_step is None and rate is None) or abs(p.seconds_per_step - rate) < 1e-9


def test_other_lines_are_not_progress():
    assert parse_progress("Loading captions: 100%|████| 8/8 [00:00<00:00]") is None


def test_failure_reason_is_the_childs_exception_not_accelerates():
    from sd3tune.simpletuner.launch import failure_reason

    lines = ["Traceback (most recent call last):", "OSError: Unable to load weights from x.safetensors",
             "Traceback (most recent call last):", '  File "launch.py", line 999, in simple_launcher',
             "subprocess.CalledProcessError: Command '[...]' returned non-zero exit status 1."]
    assert failure_reason(lines) == "OSError: Unable to load weights from x.safetensors"
    assert failure_reason(["something odd"]) == "something odd"


@pytest.mark.parametrize("line, phase", [
    ("[RANK 0] 2026-11-25 21:47:10,746 [INFO] Loading CLIP-G/14 text encoder", "loading the text encoders"),
    ("[INFO] Executing VAE cache update..", "caching VAE latents"),
    ("[INFO] Loading diffusion model from /m", "loading the SD3 transformer"),
    ("[INFO] [RANK 0] Saving current state to /runs/a/output/checkpoint-10", "saving checkpoint-10"),
    ("[INFO] [RANK 0] Saving current state to /runs/my art/output/checkpoint-10 ", "saving checkpoint-10"),
    ("\x1b[0m[RANK 0] \x1b[32m2026-12-06 08:13:10,571 [INFO] [RANK 0] Loading states from /runs/my art/output/"
     "checkpoint-40\x1b[0m", "resuming from checkpoint-40 (step 40)"),
    ("[INFO] Model components unloaded successfully.", None),
])
def test_log_lines_that_start_a_phase_are_named(line, phase):
    from sd3tune.simpletuner.launch import phase_of

    assert phase_of(line) == phase


def test_the_runs_background_for_transparent_images_reaches_the_training_process():
    from sd3tune.simpletuner.compat import ALPHA_BACKGROUND_ENV

    assert build_launch(Path("/runs/a"), "env", "bf16", environ={}, python="/py",
                        alpha_background="#112233").env[ALPHA_BACKGROUND_ENV] == "#112233"
    for refused_or_unset in ("refuse", None):  # refused: check stops the run; unset: the fix's white
        assert ALPHA_BACKGROUND_ENV not in build_launch(Path("/runs/a"), "env", "bf16", environ={}, python="/py",
                                                        alpha_background=refused_or_unset).env
