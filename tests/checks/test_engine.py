"""`sd3tune check` (and the same check at the start of `train`): the engine that reads a run and gathers every rule's
findings, and what the reader of the run's files reports through it: a catalog of broken runs, each caught in
seconds.

Every case starts from a valid run written by `run_init`, breaks one thing in the written files or the data
folder, and asserts: exit code 2, the culprit key or file is named, no traceback.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from check_helpers import (Case, assert_fails_naming_the_culprit, backend_set, backends_path, check, env_del, env_line,
                           env_path, env_set, extra_args, image_backend, json_edit, json_path, section)
from helpers import sd3tune


# (id, config format, break(run, data, tmp) -> optional other path to check, strings the output must contain)
CASES: list[Case] = [
    # config.env: types, unknown keys, choices, syntax
    ("env-wrong-type-int", "env", lambda r, d, t: env_set(r, "TRAIN_BATCH_SIZE", "two"), ("TRAIN_BATCH_SIZE",)),
    ("env-wrong-type-float", "env", lambda r, d, t: env_set(r, "LEARNING_RATE", "fast"), ("LEARNING_RATE",)),
    ("env-typo-key", "env", lambda r, d, t: env_line(r, "LEARNING_RAT='1e-4'"), ("LEARNING_RAT", "LEARNING_RATE")),
    ("env-typo-extra-arg", "env", lambda r, d, t: extra_args(r, "", "--lora_rnk=8"), ("--lora_rnk", "lora_rank")),
    ("env-bad-choice", "env", lambda r, d, t: env_set(r, "LR_SCHEDULE", "cosinus"), ("LR_SCHEDULE", "cosine")),
    ("env-bad-model-family", "env", lambda r, d, t: env_set(r, "MODEL_FAMILY", "sdxl"), ("MODEL_FAMILY",)),
    ("env-malformed-line", "env", lambda r, d, t: env_line(r, "this line has no equals sign"), ("config.env:line ",)),
    ("env-plus-equals", "env", lambda r, d, t: env_set(r, "VALIDATION_PROMPT", "a+=b"), ("config.env:line ", "+=")),
    ("env-not-utf8", "env", lambda r, d, t: env_path(r).write_bytes(b"MODEL_TYPE='\xff\xfe'\n"), ("config.env",)),
    ("env-lora-rank-zero", "env", lambda r, d, t: extra_args(r, "--lora_rank=16", "--lora_rank=0"), ("lora_rank",)),
    ("env-validation-resolution-garbage", "env", lambda r, d, t: env_set(r, "VALIDATION_RESOLUTION", "big"),
     ("VALIDATION_RESOLUTION",)),
    ("env-lower-case-key", "env", lambda r, d, t: env_line(r, "learning_rate='2e-4'"),
     ("learning_rate", "rename learning_rate to LEARNING_RATE")),
    ("env-option-name-as-key", "env", lambda r, d, t: env_line(r, "max_train_steps=5"),
     ("max_train_steps", "rename max_train_steps to MAX_NUM_STEPS")),
    # the SimpleTuner traps
    ("trap-key-false-dropped", "env", lambda r, d, t: (extra_args(r, " --gradient_checkpointing=false", ""),
                                                       env_line(r, "USE_GRADIENT_CHECKPOINTING=false")),
     ("USE_GRADIENT_CHECKPOINTING", "stays ON (its default)",
      "add --gradient_checkpointing=false to TRAINER_EXTRA_ARGS")),
    ("trap-key-false-dropped-extra-arg-on", "env",
     lambda r, d, t: (extra_args(r, "--gradient_checkpointing=false", "--gradient_checkpointing=true"),
                      env_line(r, "USE_GRADIENT_CHECKPOINTING=false")),
     ("USE_GRADIENT_CHECKPOINTING", "stays ON (set by TRAINER_EXTRA_ARGS",
      "set --gradient_checkpointing=false in TRAINER_EXTRA_ARGS")),
    ("trap-extra-args-split-on-spaces", "env", lambda r, d, t: extra_args(r, "", "--tracker_run_name=my run"),
     ("TRAINER_EXTRA_ARGS", "'run'")),
    ("trap-no-model-name", "env", lambda r, d, t: env_del(r, "MODEL_NAME"), ("MODEL_NAME", "SD3.5")),
    ("trap-json-shadows-env", "env", lambda r, d, t: json_path(r).write_text("{}"), ("config.json", "config.env")),
    ("trap-typo-dataset-key", "env", lambda r, d, t: backend_set(r, repeat=2), ("repeat", "repeats")),
    ("trap-false-string-in-dataset", "env", lambda r, d, t: backend_set(r, crop="false"), ("crop",)),
    # steps
    ("steps-negative", "env", lambda r, d, t: env_set(r, "MAX_NUM_STEPS", "-5"), ("MAX_NUM_STEPS",)),
    # run folder and config files
    ("no-config-file", "env", lambda r, d, t: env_path(r).unlink(), ("config.env",)),
    ("only-toml-config", "env", lambda r, d, t: [env_path(r).rename(r / "config" / "config.toml")],
     ("config.toml", "not TOML")),
    ("run-dir-missing", "env", lambda r, d, t: t / "no-such-run", ("no-such-run", "does not exist")),
    # config.json
    ("json-syntax-error", "json", lambda r, d, t: json_path(r).write_text('{\n  "lora_rank": 16,\n}\n'),
     ("config.json:line 3",)),
    ("json-not-an-object", "json", lambda r, d, t: json_path(r).write_text("[]"), ("config.json",)),
    ("json-false-string", "json", lambda r, d, t: json_edit(json_path(r), lambda c: c.update(
        gradient_checkpointing="False")), ("gradient_checkpointing", "'False'")),
    ("json-typo-key", "json", lambda r, d, t: json_edit(json_path(r), lambda c: c.update(learnng_rate=1e-4)),
     ("learnng_rate", "learning_rate")),
    ("json-wrong-type", "json", lambda r, d, t: json_edit(json_path(r), lambda c: c.update(train_batch_size="2x")),
     ("train_batch_size",)),
    ("json-bool-for-int-extra", "json", lambda r, d, t: json_edit(json_path(r), lambda c: c.update(
        aspect_bucket_rounding=True)), ("aspect_bucket_rounding",)),
    # multidatabackend.json
    ("backends-syntax-error", "env", lambda r, d, t: backends_path(r).write_text('[\n  {"id": "x",}\n]\n'),
     ("multidatabackend.json:line 2",)),
    ("backends-not-a-list", "env", lambda r, d, t: backends_path(r).write_text("{}"), ("multidatabackend.json",)),
    ("backends-missing", "env", lambda r, d, t: backends_path(r).unlink(), ("multidatabackend.json",)),
    ("backends-typo-required-key", "env", lambda r, d, t: json_edit(backends_path(r), lambda b: image_backend(
        b).update(instance_data_dri=image_backend(b).pop("instance_data_dir"))), ("instance_data_dri",)),
    ("backends-bad-choice", "env", lambda r, d, t: backend_set(r, caption_strategy="textfiles"),
     ("caption_strategy", "textfile")),
    ("backends-quoted-resolution", "env", lambda r, d, t: backend_set(r, resolution="64"),
     ("resolution: the string '64' is not a number", "write 64 without quotes")),
    ("backends-quoted-repeats", "env", lambda r, d, t: backend_set(r, repeats="1"),
     ("repeats", "write 1 without quotes")),
    ("backends-quoted-minimum-size", "env", lambda r, d, t: backend_set(r, minimum_image_size="32"),
     ("minimum_image_size", "'32' is not a number")),
    # data folder
    ("instance-prompt-spelled-like-the-key", "env",  # SimpleTuner stops on it after loading the model
     lambda r, d, t: backend_set(r, caption_strategy="instance_prompt", instance_prompt="myst"), ("instanceprompt",)),
]


@pytest.mark.parametrize("case_id, fmt, breaker, needles", CASES, ids=[c[0] for c in CASES])
def test_a_broken_run_fails_naming_the_culprit(make_run, tmp_path, case_id, fmt, breaker, needles):
    assert_fails_naming_the_culprit(make_run, tmp_path, fmt, breaker, needles)


@pytest.mark.parametrize("fmt", ["env", "json"])
def test_a_run_from_init_passes(make_run, fmt):
    run, _ = make_run(fmt)
    result, _ = check(run)
    assert result.exit_code == 0, result.output
    assert result.output.rstrip().splitlines()[-1].startswith("ok")
    assert "error" not in result.output.lower().replace("0 error", "")
    assert "summary: 8 images; 1 bucket [64x64: 8]" in result.output
    assert "4 steps = 1 epoch of 4 steps" in result.output


def test_a_dropped_key_false_line_beside_the_extra_arg_that_decides_only_warns(make_run):
    # init turns checkpointing off with --gradient_checkpointing=false in TRAINER_EXTRA_ARGS; SimpleTuner drops the
    # hand-added KEY=false line, so the extra arg decides: off, as the user meant
    run, _ = make_run()
    env_line(run, "USE_GRADIENT_CHECKPOINTING=false")
    result, _ = check(run)
    assert result.exit_code == 0, result.output
    assert "stays ON" not in result.output
    assert re.search(r"USE_GRADIENT_CHECKPOINTING \(line \d+\): SimpleTuner drops 'USE_GRADIENT_CHECKPOINTING=false'; "
                     r"--gradient_checkpointing is off \(set by TRAINER_EXTRA_ARGS \(line \d+\) "
                     r"--gradient_checkpointing, not by this line\) — remove the line",
                     section(result.output, "warning"))


def test_an_option_written_twice_in_config_json_warns(make_run):
    # json.loads (sd3tune's and SimpleTuner's) keeps only the last value: the first edit is silently lost
    run, _ = make_run("json")
    text = json_path(run).read_text(encoding="utf-8")
    json_path(run).write_text(text.replace('{', '{\n  "lora_rank": 4,', 1), encoding="utf-8")
    result, _ = check(run)
    assert "config.json:lora_rank: is written more than once; SimpleTuner uses the last value" \
           in section(result.output, "warning"), result.output


def test_json_values_simpletuners_parser_refuses_are_errors(make_run):
    # SimpleTuner turns config.json into --option=text for argparse: 2.0 is an invalid int, true a bare --seed
    # ("expected one argument"), false --seed=false; pydantic's lax int accepted all three
    run, _ = make_run("json")
    json_edit(json_path(run), lambda c: c.update(checkpoint_step_interval=2.0, seed=True, learning_rate=False))
    result, _ = check(run)
    errors = section(result.output, "error")
    assert result.exit_code == 2
    assert "config.json:checkpoint_step_interval: 2.0 is refused by SimpleTuner, which reads this option as a whole " \
           "number (--checkpoint_step_interval=2.0: invalid int value) — write checkpoint_step_interval: 2" in errors
    assert "config.json:seed: true is not a number; SimpleTuner passes it as a bare --seed" in errors
    assert "config.json:learning_rate: false is not a number; SimpleTuner passes it as --learning_rate=false" in errors
    assert "500 > " not in result.output  # the meant 2, not SimpleTuner's default, for the other checks


def test_quoted_booleans_in_config_json_are_refused_only_where_simpletuner_misreads_them(make_run):
    # SimpleTuner drops the string "false" (the option's default applies: true for gradient_checkpointing), makes
    # "true" a bare --option and parses "yes"/"0"/"off" as booleans; check refused every quoted word
    run, _ = make_run("json")
    json_edit(json_path(run), lambda c: c.update(use_ema="yes", disable_benchmark="True", set_grads_to_none="on"))
    result, _ = check(run)
    assert result.exit_code == 0, result.output
    assert "use_ema" not in result.output and "disable_benchmark" not in result.output
    json_edit(json_path(run), lambda c: c.update(use_ema="false", gradient_checkpointing="False"))
    result, _ = check(run)
    assert result.exit_code == 2
    assert "config.json:gradient_checkpointing: SimpleTuner drops the string 'False', so its default, true, applies " \
           "— write gradient_checkpointing: false without quotes" in section(result.output, "error"), result.output
    assert "config.json:use_ema: SimpleTuner drops the string 'false', so its default, false, applies, as meant" \
           in section(result.output, "warning"), result.output


def test_names_simpletuner_still_reads_are_warnings_not_errors(make_run):
    # SimpleTuner renames save_total_limit (config.json) and reads lr_scheduler cosine_with_warmup as cosine;
    # check called them unknown / an invalid choice (suggesting constant_with_warmup) and refused the run
    run, _ = make_run("json")
    def edit(config):
        config.pop("checkpoints_total_limit", None)
        config.update(save_total_limit=3, lr_scheduler="cosine_with_warmup")

    json_edit(json_path(run), edit)
    result, _ = check(run)
    assert result.exit_code == 0, result.output
    warnings = section(result.output, "warning")
    assert "config.json:save_total_limit: an old name of checkpoints_total_limit; SimpleTuner reads it as that" \
           in warnings
    assert "config.json:lr_scheduler: SimpleTuner reads 'cosine_with_warmup' as 'cosine'" in warnings


def test_a_config_json_saved_with_a_bom_says_so(make_run):
    # SimpleTuner's json.load fails on a BOM too; the hint said "a trailing comma or a missing quote is typical"
    run, _ = make_run("json")
    json_path(run).write_bytes(b"\xef\xbb\xbf" + json_path(run).read_bytes())
    result, _ = check(run)
    assert result.exit_code == 2
    assert "config.json: starts with a byte-order mark (BOM), which SimpleTuner cannot read — save the file as UTF-8 " \
           "without BOM" in section(result.output, "error"), result.output


def test_a_null_option_in_config_json_warns_that_simpletuner_uses_its_default(make_run):
    # SimpleTuner drops null options: "lora_rank": null trains at its default rank, not what the file seems to say
    run, _ = make_run("json")
    json_edit(json_path(run), lambda c: c.update(lora_rank=None))
    result, _ = check(run)
    assert "config.json:lora_rank: null: SimpleTuner ignores the key and uses its default 16" \
           in section(result.output, "warning"), result.output


def test_findings_are_file_key_problem_fix_lines(make_run):
    run, _ = make_run()
    env_set(run, "OPTIMIZER", "adamw")
    result, _ = check(run)
    line = next(line for line in result.output.splitlines() if "OPTIMIZER" in line)
    assert re.match(r"^  config\.env:OPTIMIZER \(line \d+\): .+ — .+$", line), line


def test_every_problem_is_reported_at_once(make_run, tmp_path):
    run, data = make_run()
    env_set(run, "OPTIMIZER", "adamw")
    env_set(run, "TRAIN_BATCH_SIZE", "two")  # an invalid value must not hide the other config checks
    env_set(run, "MODEL_NAME", str(tmp_path / "missing-model"))
    env_line(run, "LEARNIN_RATE='1e-4'")
    (data / "concept_04.txt").unlink()
    (data / "concept_03.png").write_bytes(b"garbage")
    backend_set(run, repeat=2)
    result, _ = check(run)
    assert result.exit_code == 2
    errors = section(result.output, "error")
    for needle in ("OPTIMIZER", "TRAIN_BATCH_SIZE", "MODEL_NAME", "LEARNIN_RATE", "concept_04.txt", "concept_03.png",
                   "repeat"):
        assert needle in errors, (needle, result.output)
    assert re.search(r"^\d+ errors:$", result.output, flags=re.M)


def test_json_output_lists_errors_warnings_and_summary(make_run):
    run, data = make_run()
    result, _ = check(run, "--json")
    report = json.loads(result.output)
    assert result.exit_code == 0 and report["ok"] is True and report["errors"] == []
    assert {"images", "buckets", "steps", "steps_per_epoch", "epochs", "gpu_memory_gb"} <= set(report["summary"])
    assert report["summary"]["images"] == 8 and report["summary"]["buckets"] == {"64x64": 8}
    assert report["summary"]["steps"] == 4 and report["summary"]["epochs"] == 1.0

    env_set(run, "OPTIMIZER", "adamw")
    (data / "concept_04.txt").write_text("")
    result, _ = check(run, "--json")
    report = json.loads(result.output)
    assert result.exit_code == 2 and report["ok"] is False
    assert [e["key"] for e in report["errors"]] == ["OPTIMIZER"]  # as the user spells it, the line apart
    line = report["errors"][0]["line"]
    assert (run / "config" / "config.env").read_text().splitlines()[line - 1].startswith("OPTIMIZER=")
    assert set(report["errors"][0]) == {"severity", "file", "key", "line", "message", "hint"}
    empty = next(w for w in report["warnings"] if "empty" in w["message"])
    assert empty["key"] is None and empty["line"] is None  # a finding about a folder: no key, no line
    env_line(run, "this is no assignment")
    bad = next(e for e in json.loads(check(run, "--json")[0].output)["errors"] if "KEY=VALUE" in e["message"])
    assert bad["key"] is None and bad["line"] == len(env_path(run).read_text().splitlines())
    assert any("empty" in w["message"] for w in report["warnings"])


def test_warnings_alone_exit_zero(make_run):
    run, _ = make_run()
    env_set(run, "LEARNING_RATE", "0.01")  # high, but legal
    result, _ = check(run, env={"MODEL_NAME": "someone/else"})  # a stray variable SimpleTuner would read
    assert result.exit_code == 0, result.output
    warnings = section(result.output, "warning")
    assert "LEARNING_RATE" in warnings and "environment:MODEL_NAME" in warnings
    assert result.output.rstrip().endswith("ok (with warnings)")


def test_hand_edits_simpletuner_reads_differently_from_a_shell_warn(make_run):
    # a second MAX_NUM_STEPS line silently won; $(...) in a double-quoted value is text to SimpleTuner but runs when
    # a shell sources the file (which sd3tune's own quoting never allows)
    run, _ = make_run()
    env_line(run, 'VALIDATION_PROMPT="$(touch /tmp/pwned) castle"')
    env_line(run, "MAX_NUM_STEPS=6")
    result, _ = check(run)
    warnings = section(result.output, "warning")
    assert re.search(r"MAX_NUM_STEPS \(line \d+\): also set on line \d+; SimpleTuner takes this later value", warnings)
    assert re.search(r"VALIDATION_PROMPT \(line \d+\): holds \$\(...\)", warnings)
    assert "summary: 8 images; 1 bucket [64x64: 8]; effective batch 2; 6 steps" in result.output  # the later value
    env_line(run, "VALIDATION_PROMPT='$(not run) castle'")  # single quotes: bash expands nothing
    assert section(check(run)[0].output, "warning").count("holds $(") == 1


def test_quotes_simpletuner_keeps_in_the_value_warn(make_run):
    # VALIDATION_PROMPT='unbalanced passed as "ok": SimpleTuner sampled "'unbalanced" and bash cannot source the file
    from sd3tune.simpletuner.envfile import parse_env_text

    run, _ = make_run()
    assert "unmatched or nested quotes" not in check(run)[0].output  # what init writes
    stray = ["'unbalanced", "closed'", "it's", "'a' 'b'", '"say "hi""']
    fine = ["'castle'", '"it\'s"', "'say \"hi\"'", "plain", "'", ""]
    entries, _ = parse_env_text("".join(f"K{i}={v}\n" for i, v in enumerate(stray + fine)))
    assert [e.stray_quotes for e in entries] == [True] * len(stray) + [False] * len(fine)
    env_line(run, "VALIDATION_PROMPT='sd3tune-style, a castle")
    warnings = section(check(run)[0].output, "warning")
    assert re.search(r"VALIDATION_PROMPT \(line \d+\): unmatched or nested quotes in 'sd3tune-style, a castle: "
                     r"SimpleTuner reads the value as \"'sd3tune-style, a castle\", quotes kept", warnings), warnings


def test_each_missing_required_key_is_reported_once_with_its_fix(make_run):
    # both paths missing made pydantic report the whole `paths` section too, next to the two keys
    run, _ = make_run()
    env_del(run, "OUTPUT_DIR")
    env_del(run, "DATALOADER_CONFIG")
    result, _ = check(run)
    assert result.exit_code == 2
    errors = section(result.output, "error").splitlines()
    assert [e for e in errors if "OUTPUT_DIR" in e] == [
        "  config.env:OUTPUT_DIR: is not set — set OUTPUT_DIR to a folder for the LoRA and checkpoints"]
    assert len([e for e in errors if "DATALOADER_CONFIG" in e]) == 1
    assert not [e for e in errors if "paths" in e or "required but not set" in e]
    from sd3tune.config.models import RunConfig
    from sd3tune.simpletuner import keys

    required = [f"{name}.{sub}" for name, f in RunConfig.model_fields.items() if f.is_required()
                for sub, g in f.annotation.model_fields.items() if g.is_required()]
    assert required and all(keys.KEY_BY_PATH[path].option in keys.REQUIRED_OPTIONS for path in required)


def test_a_run_written_before_the_compile_and_prefetch_settings_still_checks_clean(make_run):
    # SimpleTuner's defaults fill the gaps: dynamo_mode '' (unset) reads as torch.compile's default mode
    run, _ = make_run()
    for option in ("--dataloader_prefetch=true", "--dynamo_backend=no", "--dynamo_use_regional_compilation=true",
                   "--dynamo_mode=reduce-overhead", "--dynamo_wrapper=python"):
        extra_args(run, " " + option, "")
    assert "dynamo" not in env_path(run).read_text()
    result, _ = check(run)
    assert result.exit_code == 0, result.output
    assert "error" not in result.output


def test_unreadable_config_file_is_a_finding_not_a_traceback(make_run, monkeypatch):
    import pathlib

    import sd3tune.checks as checks

    run, _ = make_run()
    read_text = pathlib.Path.read_text

    def deny(self, *args, **kwargs):
        if self.name == "config.env":
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", deny)
    report = checks.check_run(run)
    assert [f.render() for f in report.errors] == ["config.env: cannot be read: Permission denied — check the "
                                                   "file's permissions"]


def test_a_bug_in_one_rule_is_reported_and_the_other_rules_still_run(make_run, monkeypatch):
    import sd3tune.checks.engine as engine

    def broken(ctx):
        raise KeyError("boom")

    run, _ = make_run()
    env_set(run, "OPTIMIZER", "adamw")
    monkeypatch.delenv("SD3TUNE_DEBUG", raising=False)
    monkeypatch.setattr(engine, "RULES", (broken, *engine.RULES))
    report = engine.check_run(run)
    assert any(f.key == "broken" and "internal error" in f.message for f in report.errors)
    assert any("OPTIMIZER" in f.key for f in report.errors)


def test_train_refuses_a_broken_run_before_launching(make_run, monkeypatch):
    from sd3tune.commands.train import TrainOptions, run_train
    from sd3tune.errors import ConfigError
    from sd3tune.simpletuner import launch

    def no_launch(*a, **k):
        raise AssertionError("SimpleTuner was launched")

    monkeypatch.setattr(launch, "run_plan", no_launch)
    monkeypatch.setattr("sd3tune.commands.train.run_plan", no_launch)
    run, _ = make_run()
    env_set(run, "OPTIMIZER", "adamw")
    with pytest.raises(ConfigError) as info:
        run_train(TrainOptions(run_dir=run))
    assert "OPTIMIZER" in str(info.value) and any("OPTIMIZER" in f.key for f in info.value.findings)
    assert not (run / "logs").exists() and not (run / "output").exists()


def test_real_process_output_names_the_culprits_without_traceback(make_run):
    run, data = make_run()
    ok = sd3tune("check", run)
    assert ok.code == 0 and "Traceback" not in ok.out + ok.err and ok.out.rstrip().endswith("ok (with warnings)")
    (data / "concept_03.png").write_bytes(b"garbage")
    env_set(run, "OPTIMIZER", "adamw")
    bad = sd3tune("check", run)
    assert "Traceback" not in bad.out + bad.err
    assert "concept_03.png" in bad.out and "OPTIMIZER" in bad.out and "check failed" in bad.out
    train = sd3tune("train", run)
    assert train.code == 2 and "Traceback" not in train.out + train.err
    assert "OPTIMIZER" in train.err and not (run / "logs").exists()


def test_real_process_check_exits_2_on_errors(make_run):
    run, _ = make_run()
    env_set(run, "OPTIMIZER", "adamw")
    assert sd3tune("check", run).code == 2


def test_check_imports_no_torch(make_run):
    """The whole `sd3tune check` path (CLI included) runs without torch, diffusers, transformers or SimpleTuner."""
    run, _ = make_run()
    code = ("import sys\n"
            "from sd3tune.cli import main\n"
            "try:\n"
            f"    main(['check', {str(run)!r}])\n"
            "except SystemExit as exc:\n"
            "    assert not exc.code, exc.code\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'simpletuner', 'accelerate') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "print('clean')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stdout + proc.stderr


def test_a_run_folder_given_with_a_quoted_tilde_is_found(make_run):
    run, _ = make_run()
    home = run.parent
    for command in (["check"], ["train", "--dry-run"]):
        r = sd3tune(*command, f"~/{run.name}", env={"HOME": str(home)})
        assert r.code == 0, (command, r.err)


def test_a_missing_required_option_is_named_in_the_runs_own_format(make_run):
    run, _ = make_run("json")
    config = json.loads((run / "config" / "config.json").read_text())
    del config["model_type"]
    (run / "config" / "config.json").write_text(json.dumps(config))
    r = sd3tune("check", run)
    assert r.code == 2 and "config.json:model_type: is not set — set model_type to lora" in r.out
