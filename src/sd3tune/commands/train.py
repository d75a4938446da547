"""`sd3tune train`: validate the run, then launch SimpleTuner through `accelerate launch`, with live progress."""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sd3tune.checks import check_run
from sd3tune.console import TrainConsole, clock
from sd3tune.config.models import RunConfig
from sd3tune.errors import ConfigError, Sd3tuneError, TrainingFailed
from sd3tune.findings import plural
from sd3tune.fsutil import file_sha256
from sd3tune.lora import at_step, safetensors_metadata, stamp_checkpoints, stamp_lora, stamped, training_stamp
from sd3tune.manifest import now, package_versions, read_manifest, update_manifest
from sd3tune.simpletuner import keys
from sd3tune.simpletuner.launch import (LaunchPlan, Progress, StopSignals, build_launch, cuda_graphs_message,
                                        failure_reason, fix_not_applied_message, phase_of, run_plan)
from sd3tune.simpletuner.layout import (RunPaths, checkpoint_step, checkpoints, incomplete_checkpoint,
                                       incomplete_hint, output_conflict, validation_images)
from sd3tune.simpletuner.caches import prepare_dataset_caches
from sd3tune.simpletuner.processes import Processes, plan_processes
from sd3tune.simpletuner.transparency import run_alpha_background


@dataclass
class TrainOptions:
    run_dir: Path
    resume: bool = False
    dry_run: bool = False
    gpus: int = 1
    accelerate_config: Path | None = None
    extra_accelerate_args: list[str] = field(default_factory=list)
    cuda_graphs: bool = False  # replay the transformer's training passes from CUDA graphs (compat fix 9)
    warnings: bool = True  # say check's warnings (through on_status) before launching


@dataclass
class TrainResult:
    plan: LaunchPlan
    lora: Path | None = None
    log: Path | None = None
    seconds: float = 0.0
    last: Progress | None = None


def job_processes(opts: TrainOptions) -> Processes:
    """The job's processes from --gpus or the accelerate file (a file that is not there, does not parse or contradicts
    the launch: a user error, before anything else is read)."""
    return plan_processes(opts.gpus, opts.accelerate_config, opts.extra_accelerate_args)


def prepare(opts: TrainOptions) -> tuple[LaunchPlan, object]:
    """Validate the run and build the launch (raises ConfigError with every finding on a broken run)."""
    processes = job_processes(opts)
    report = check_run(opts.run_dir, gpus=processes.total, resume=opts.resume)
    if report.run.config is not None:  # said as itself, before any other finding: what to decide first
        conflict = output_conflict(report.run.output_dir(), opts.resume, report.run.config.optim.max_train_steps)
        if conflict:
            raise Sd3tuneError(conflict[0], hint=conflict[1])
    errors = report.errors
    if errors:
        raise ConfigError(f"{plural(len(errors), 'problem')} in {opts.run_dir}, first: {errors[0].render()}",
                          hint=f"run `{report.command}` for the full list", findings=report.findings)
    cfg = report.run.config
    assert cfg is not None and report.run.format is not None
    accelerate_config = None
    if opts.accelerate_config is not None:  # accelerate runs in the run folder: pass the file as the user meant it
        accelerate_config = opts.accelerate_config.expanduser().resolve()
    if opts.cuda_graphs:
        check_cuda_graphs(cfg, processes.total)
    plan = build_launch(report.run.paths.root, report.run.format, cfg.precision.mixed_precision, gpus=opts.gpus,
                        accelerate_config=accelerate_config, extra_accelerate_args=opts.extra_accelerate_args,
                        cuda_graphs=opts.cuda_graphs,
                        alpha_background=run_alpha_background(read_manifest(report.run.paths.root)))
    model = cfg.model.name_or_path
    if not report.run.paths.resolve(model).exists():  # a Hub id (check passed): SimpleTuner fails only after start-up
        from sd3tune.hub import model_files_only

        key = report.run.key_for("pretrained_model_name_or_path", located=False)
        if model_files_only(model, f"set {key} to a local diffusers folder"):
            plan.env["HF_HUB_OFFLINE"] = "1"  # in the cache: SimpleTuner loads it from there without asking the Hub
    return plan, report


def check_cuda_graphs(cfg: RunConfig, gpus: int) -> None:
    """Refuse ``--cuda-graphs`` where the training process could never replay a graph (it would run eagerly, silently
    ignoring the request); what only the training process can see (no CUDA GPU, an odd call) it logs itself."""
    conflicts = []
    if cfg.compile.backend != "no":
        conflicts.append((f"compile.backend is {cfg.compile.backend}", "set compile.backend to no"))
    if cfg.precision.gradient_checkpointing:
        conflicts.append(("gradient checkpointing is on", "set precision.gradient_checkpointing to false"))
    if gpus > 1:
        conflicts.append((f"{gpus} processes", "train on one GPU"))
    if conflicts:
        why, fix = conflicts[0]
        raise Sd3tuneError(f"--cuda-graphs cannot replay this run: {why}", hint=f"{fix}, or drop --cuda-graphs")


def visible_gpus() -> tuple[str, int]:
    """The accelerator SimpleTuner will train on and how many of it this process sees: ("cuda", n), ("mps", 1) or
    ("cpu", 0)."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.cuda.device_count()
    if torch.backends.mps.is_available():
        return "mps", 1
    return "cpu", 0


def _check_gpus(gpus: int, on_status: Callable[[str], None] | None, source: str = "--gpus") -> None:
    """Refuse --gpus beyond the GPUs visible here (the process of rank N trains on GPU N: a device that is not there
    fails it after start-up); say when there is no GPU at all (SimpleTuner then trains on the CPU, --gpus N in N CPU
    processes)."""
    kind, count = visible_gpus()
    if 0 < count < gpus:
        asked = f"--gpus {gpus}" if source == "--gpus" else f"{source} starts {gpus} processes here"
        raise Sd3tuneError(f"{asked} but only {plural(count, 'GPU')} ({kind}) visible on this machine",
                           hint=(f"pass --gpus {count}" if count > 1 else "drop --gpus") + " (CUDA_VISIBLE_DEVICES "
                                "limits what is visible); several machines: --accelerate-config FILE")
    if count == 0 and on_status:
        processes = f" in {gpus} CPU processes" if gpus > 1 else ""
        on_status(f"note: no GPU is visible (CUDA or MPS): SimpleTuner trains on the CPU{processes}, fine for a tiny "
                  "test model, far too slow for SD3 Medium")


def run_train(opts: TrainOptions, on_progress: Callable[[Progress], None] | None = None,
              on_status: Callable[[str], None] | None = None) -> TrainResult:
    """Train the run, holding RUN/.lock throughout (a second `train` of the run is refused; --dry-run takes none)."""
    if opts.dry_run or not opts.run_dir.is_dir():  # no run folder: prepare says so
        return _train(opts, on_progress, on_status)
    from sd3tune.locks import folder_lock

    with folder_lock(opts.run_dir, "train", on_note=on_status):
        return _train(opts, on_progress, on_status)


def _train(opts: TrainOptions, on_progress: Callable[[Progress], None] | None,
           on_status: Callable[[str], None] | None) -> TrainResult:
    plan, report = prepare(opts)
    result = TrainResult(plan)
    for finding in report.warnings if on_status and opts.warnings else []:  # for a user who skipped `check`
        on_status(f"warning: {finding.render()}")
    if opts.dry_run:  # the command may be meant for another machine: this one's GPUs are not asked
        return result
    processes = job_processes(opts)  # a file over several machines starts only its share of processes here
    _check_gpus(processes.here, on_status if opts.warnings else None, processes.source)
    cfg = report.run.config
    paths: RunPaths = report.run.paths
    for note in prepare_dataset_caches(cfg, report.run.backends or [], paths):
        if on_status:
            on_status(note)
    output = report.run.output_dir()
    # the LoRA's stamp (its safetensors metadata), for it and this training's checkpoints; resumed: what trained before
    resumed_from = checkpoints(output)[-1] if opts.resume else None  # the one SimpleTuner resumes from: the latest
    lora_stamp = training_stamp(cfg, report.run.backends or [], paths.root, resumed_from)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    from sd3tune.locks import claim_name

    paths.logs.mkdir(parents=True, exist_ok=True)
    log = claim_name(paths.logs, f"train-{stamp}", ".log").resolve()  # absolute in the manifest, a name of its own
    result.log = log
    if on_status:
        machines = f" on {processes.machines} machines" if processes.machines > 1 else ""
        on_status(f"launching SimpleTuner ({plural(processes.total, 'process', 'processes')}{machines}, effective "
                  f"batch {report.summary.effective_batch}); full log: {log}")
    start, launched = time.monotonic(), time.time()
    last_phase = None
    skipped_fixes: set[str] = set()  # each process says it in the log and on stderr: shown once
    shown = _ValidationImages(output, paths.root, on_status)

    def progressed(progress: Progress) -> None:
        shown.look()
        if on_progress:
            on_progress(progress)

    def on_line(line: str) -> None:
        nonlocal last_phase
        shown.look()
        graphs = cuda_graphs_message(line)
        if graphs and on_status:
            on_status(f"CUDA graphs: {graphs}")
        skipped = fix_not_applied_message(line)
        if skipped and on_status and skipped not in skipped_fixes:
            skipped_fixes.add(skipped)
            on_status(f"warning: sd3tune's compat {skipped} (training goes on without it)")
        phase = phase_of(line)
        if phase and on_status and phase != last_phase:
            last_phase = phase
            on_status(f"SimpleTuner: {phase}, elapsed {clock(time.monotonic() - start)}")

    with StopSignals() as signals:  # a signal during the stop, the stamping or the record cannot cut them short
        outcome = run_plan(plan, log, on_progress=progressed, on_line=on_line, signals=signals, clock_start=start)
        result.seconds = time.monotonic() - start
        result.last = outcome.last_progress
        shown.look(final=True)
        entry = {"started": stamp, "finished": now(), "seconds": round(result.seconds, 1),
                 "exit_code": outcome.returncode, "resume": opts.resume,
                 **({"resumed_from": resumed_from.name} if resumed_from else {}), "gpus": opts.gpus,
                 "processes": processes.total, "machines": processes.machines,
                 "effective_batch": report.summary.effective_batch,
                 "cuda_graphs": opts.cuda_graphs, "log": str(log), "command": plan.argv,
                 "validation_images": shown.recorded(),
                 "versions": package_versions("simpletuner", "accelerate", "diffusers", "peft", "transformers",
                                              "torch")}
        lora = output / keys.LORA_WEIGHT_NAME
        steps = outcome.last_progress.step if outcome.last_progress else None

        def record(status: str, **more) -> None:  # first, before any stamping: a full disk must not lose it
            try:
                update_manifest(paths.root, "trainings", {**entry, "status": status, **more}, append=True)
            except Sd3tuneError as exc:
                warn(f"this training is not in {paths.root / 'sd3tune.json'}: {exc.message}")

        def warn(text: str) -> None:
            if on_status:
                on_status(f"warning: {text}")

        def stamp_checkpoints_noting() -> None:  # a checkpoint is resumed from, or sampled, later
            try:
                stamp_checkpoints(output, lora_stamp,
                                  after_step=(checkpoint_step(resumed_from) or 0) if resumed_from else 0)
            except Sd3tuneError as exc:  # (a full disk) the training's own outcome stays what is said
                warn(f"the checkpoints are not all stamped with their settings: {exc.message}")

        if outcome.interrupted:
            # a Ctrl-C after SimpleTuner saved the final LoRA (while it tore down): that LoRA is this training's
            saved = lora.is_file() and lora.stat().st_mtime >= launched and safetensors_metadata(lora) is not None
            if saved:  # saved after every step (the progress read may stop a step or two short)
                steps = outcome.last_progress.total if outcome.last_progress else None
                try:
                    saved = stamped(lora, at_step(lora_stamp, steps))
                except Sd3tuneError as exc:
                    saved = False
                    warn(f"{lora} is not stamped: {exc.message}")
            record("interrupted", signal=outcome.signal, **(
                {"lora": str(lora), "lora_sha256": file_sha256(lora), "steps": steps} if saved else {}))
            stamp_checkpoints_noting()
            raise _interrupted(opts, cfg, report, output, lora, saved)
        if outcome.returncode != 0:
            detail = failure_reason(outcome.tail)  # SimpleTuner's own error, recorded before anything else
            record("failed", error=detail)
            stamp_checkpoints_noting()
            raise TrainingFailed(f"SimpleTuner exited with code {outcome.returncode}: {detail}",
                                 hint=f"see the full log {log}", exit_code=outcome.returncode)
        stamp_checkpoints_noting()
        if not lora.is_file():
            record("failed", error=f"no {keys.LORA_WEIGHT_NAME} written")
            raise TrainingFailed(f"SimpleTuner finished but wrote no {keys.LORA_WEIGHT_NAME} in {lora.parent}",
                                 hint=f"see the full log {log}", exit_code=1)
        stamp_lora(lora, at_step(lora_stamp, steps))
        final_loss = outcome.last_progress.loss if outcome.last_progress else None
        record("ok", lora=str(lora), lora_sha256=file_sha256(lora), steps=steps, final_loss=final_loss)
    result.lora = lora
    return result


def _interrupted(opts: TrainOptions, cfg: RunConfig, report, output: Path, lora: Path, saved: bool) -> TrainingFailed:
    """What an interrupted training says: what it left and how to go on."""
    kept = checkpoints(output)
    if kept and incomplete_checkpoint(kept[-1]):  # Ctrl-C during its save: resuming from it would fail
        return TrainingFailed(f"training interrupted while saving {kept[-1].name}, which is incomplete",
                              hint=incomplete_hint(output, opts.run_dir), exit_code=130)
    done = kept and output_conflict(output, True, cfg.optim.max_train_steps)  # every step: --resume refuses
    run = shlex.quote(str(opts.run_dir))
    if saved or done:
        more = (f"raise {report.run.key_for('max_train_steps', located=False)} and continue with "
                f"`sd3tune train {run} --resume` to train further")
        return TrainingFailed(
            "training interrupted after its last step; " + (f"its LoRA {lora} is saved" if saved else
                                                              f"{kept[-1].name} holds the trained LoRA"),
            hint=f"use it as it is, or {more}", exit_code=130)
    return TrainingFailed(f"training interrupted; {kept[-1].name} is kept" if kept else
                          "training interrupted before its first checkpoint",
                          hint=f"continue with `sd3tune train {run} --resume`" if kept else
                          f"start again with `sd3tune train {run}`", exit_code=130)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1


class _ValidationImages:
    """The validation images SimpleTuner samples during this training (output/validation_images/step_N_*): said as
    they appear (a look at the folder at most once a second, and once at the end), and recorded for the manifest."""

    def __init__(self, output: Path, root: Path, on_status: Callable[[str], None] | None) -> None:
        self.output, self.root, self.on_status = output, root, on_status
        self.before = {p: _mtime(p) for p in validation_images(output)}  # an earlier training's (the one resumed)
        self.new: dict[Path, int] = {}
        self.looked = time.monotonic()

    def look(self, final: bool = False) -> None:
        if not final and time.monotonic() - self.looked < 1.0:
            return
        self.looked = time.monotonic()
        fresh = {p: step for p, step in validation_images(self.output).items()
                 if p not in self.new and self.before.get(p, -1) != _mtime(p)}  # new, or written again
        self.new.update(fresh)
        for step in dict.fromkeys(fresh.values()) if self.on_status else ():
            names = [p for p, s in fresh.items() if s == step]
            where = str(names[0]) if len(names) == 1 else \
                f"{names[0].parent}/ ({', '.join(p.name for p in names)})"
            self.on_status(f"validation image{'s' if len(names) > 1 else ''} at step {step}: {where}")

    def recorded(self) -> list[dict]:
        """[{"step": N, "path": ...}], paths relative to the run folder (absolute when the output lies outside it)."""
        root = self.root.resolve()
        return [{"step": step, "path": os.path.relpath(p.resolve(), root) if p.resolve().is_relative_to(root)
                 else str(p.resolve())} for p, step in sorted(self.new.items(), key=lambda item: (item[1], item[0].name))]


# --- `sd3tune train` on the command line (sd3tune.cli loads it when the command runs or shows its help) ---

from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402

from sd3tune.cli import command_app  # noqa: E402
from sd3tune.commands.options import RunDir  # noqa: E402

app = command_app()


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_command(
    ctx: typer.Context,
    run_dir: RunDir,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the exact command and environment; run nothing.")] = False,
    gpus: Annotated[int, typer.Option("--gpus", help="Number of GPUs (processes) on this machine.")] = 1,
    accelerate_config: Annotated[Optional[Path], typer.Option("--accelerate-config", help="accelerate config file (multi-node, DeepSpeed, FSDP).")] = None,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs/--no-cuda-graphs", help="Replay the transformer's training passes from CUDA graphs: ~15% faster steps on an H100 (one CUDA GPU; no compile, no gradient checkpointing).")] = False,
) -> None:
    """Train the run with SimpleTuner through `accelerate launch` (one GPU by default).

    Arguments after `--` go to `accelerate launch`. The run is checked first and nothing
    is launched when it has errors.

    \b
    examples:
      sd3tune train runs/art
      sd3tune train runs/art --dry-run
      sd3tune train runs/art --gpus 4
      sd3tune train runs/art --cuda-graphs
      sd3tune train runs/art --accelerate-config fsdp.yaml -- --main_process_port 29501
    """
    console = TrainConsole()
    try:
        result = run_train(TrainOptions(run_dir=run_dir, resume=resume, dry_run=dry_run, gpus=gpus,
                                        accelerate_config=accelerate_config, extra_accelerate_args=list(ctx.args),
                                        cuda_graphs=cuda_graphs),
                           on_progress=console, on_status=console.status)
    finally:  # an error line or the result next: below the progress line, not glued to it
        console.close()
    if dry_run:
        typer.echo(result.plan.shell())
        return
    typer.echo(f"trained in {result.seconds:.0f} s: {result.lora}")
