"""The preflight engine: read a run, run every rule over one :class:`Context`, and gather the findings.

A rule is a small ``check_*`` function over a :class:`Context` that returns findings (``file:key: problem — fix``);
the rules live by concern in :mod:`.options`, :mod:`.paths`, :mod:`.datasets` (with :mod:`.budget`) and :mod:`.model`
(the base model's own limits). A config or dataset entry that fails validation is checked as far as it can be: its
invalid values are left out (``best_effort_config``, ``best_effort_backends``) and the rules on them are skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from shlex import quote
from typing import Any, Callable

from pydantic import ValidationError

from sd3tune.checks.datasets import check_backends
from sd3tune.checks.model import check_model_sizes
from sd3tune.checks.summary import DatasetShare
from sd3tune.checks.options import check_extra_options, check_model, check_steps, check_training, check_traps
from sd3tune.checks.paths import check_environment, check_paths
from sd3tune.config.models import RunConfig
from sd3tune.datascan import ScanResult, scan_folder
from sd3tune.findings import Finding, error, errors_in
from sd3tune.simpletuner import keys
from sd3tune.simpletuner.backends import BACKENDS as BACKEND_LIST
from sd3tune.simpletuner.backends import ImageBackend, TextEmbedsBackend
from sd3tune.simpletuner.catalog import Catalog, load_catalog
from sd3tune.simpletuner.layout import RunPaths
from sd3tune.simpletuner.loaded import LoadedRun
from sd3tune.simpletuner.reader import config_from_args, read_run, with_simpletuner_defaults


@dataclass
class Summary:
    images: int = 0  # readable images in the enabled image datasets
    usable: int = 0  # of those, the ones that survive the size filter and bucket pruning
    samples_per_epoch: int = 0  # usable images x (repeats + 1)
    buckets: dict[str, int] = field(default_factory=dict)  # "WxH" -> usable images
    processes: int = 1  # data-parallel processes of the job (GPUs, all machines)
    effective_batch: int | None = None  # processes x batch x accumulation: samples per optimizer step
    steps: int | None = None
    steps_per_epoch: int | None = None
    epochs: float | None = None
    preset: str | None = None
    gpu_memory_gb: float | None = None  # GiB, budget.gpu_memory_estimate
    gpu_memory_error_gb: float | None = None  # its largest error over the measured peaks; None: extrapolated
    cache_gb: float | None = None
    datasets: list[DatasetShare] = field(default_factory=list)  # each image dataset's images, buckets, share

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.images, "usable_images": self.usable, "samples_per_epoch": self.samples_per_epoch,
                "buckets": self.buckets, "processes": self.processes,
                "effective_batch_size": self.effective_batch, "steps": self.steps,
                "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs, "preset": self.preset,
                "gpu_memory_gb": self.gpu_memory_gb,
                "gpu_memory_error_gb": self.gpu_memory_error_gb, "cache_gb": self.cache_gb,
                "datasets": [vars(d) for d in self.datasets]}


@dataclass
class CheckReport:
    run: LoadedRun
    findings: list[Finding]
    summary: Summary
    resume: bool = False  # checked as `sd3tune train --resume` would
    scans: dict[Path, ScanResult] = field(default_factory=dict)  # each image folder as scanned (resolved path)

    @property
    def command(self) -> str:
        """The `sd3tune check` command that makes this report again."""
        return f"sd3tune check {quote(str(self.run.paths.root))}" + (" --resume" if self.resume else "")

    @property
    def ok(self) -> bool:
        return not errors_in(self.findings)

    @property
    def errors(self) -> list[Finding]:
        return errors_in(self.findings)

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def as_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run.paths.root), "format": self.run.format, "resume": self.resume, "ok": self.ok,
                "errors": [f.as_dict() for f in self.errors], "warnings": [f.as_dict() for f in self.warnings],
                "summary": self.summary.as_dict()}


@dataclass
class Context:
    """What every rule sees: the run as read, a best-effort config, and which options hold invalid values."""

    run: LoadedRun
    catalog: Catalog
    cfg: RunConfig | None  # run.config, or (when that is invalid) the run with its invalid values left out
    bad: set[str]  # SimpleTuner options whose value is invalid (already reported; rules on them are skipped)
    gpus: int
    summary: Summary
    backends: list[ImageBackend | TextEmbedsBackend] | None = None  # run.backends, or the valid part of them
    backends_partial: bool = False  # some dataset entries were invalid (already reported) and are left out
    scans: dict[Path, ScanResult] = field(default_factory=dict)
    datasets: list = field(default_factory=list)  # the image datasets as they train (datasets.UsableDataset)
    resume: bool = False  # checked for `sd3tune train --resume`: a checkpoint in the output folder is expected

    @property
    def root(self) -> Path:
        return self.run.paths.root

    @property
    def file(self) -> str:
        return self.run.paths_name()

    def where(self, option: str) -> str:
        """The key a user edits for ``option``: its config.env line, TRAINER_EXTRA_ARGS entry or JSON key."""
        return self.run.key_for(option, catalog=self.catalog)

    def key(self, option: str) -> str:
        """The bare key name for ``option`` (no line number), for use inside a message."""
        return self.run.key_for(option, located=False, catalog=self.catalog)

    def valid(self, *options: str) -> bool:
        return self.cfg is not None and not (set(options) & self.bad)

    def path(self, value: str) -> Path:
        return self.run.paths.resolve(value)

    def flag(self, option: str) -> bool:
        return self.run.args.get(option) is True  # the reader made every boolean option a bool

    def scan(self, folder: Path) -> ScanResult:
        key = folder.resolve()
        if key not in self.scans:
            self.scans[key] = scan_folder(folder)
        return self.scans[key]


def check_run(run_dir: str | Path, gpus: int = 1, resume: bool = False) -> CheckReport:
    """Read and check a run folder (for a training on ``gpus``, resuming or not); never raises for a user
    mistake."""
    catalog = load_catalog()
    try:
        run = read_run(run_dir, catalog)
    except OSError as exc:  # e.g. a config file without read permission
        run = LoadedRun(paths=RunPaths(Path(run_dir).expanduser()))
        name = Path(exc.filename).name if exc.filename else str(run_dir)
        run.findings.append(error(name, "", f"cannot be read: {exc.strerror or exc}",
                                  "check the file's permissions"))
        return CheckReport(run, run.findings, Summary(), resume)
    findings = list(run.findings)
    # Nothing read from a config file that could not be parsed (the reader says why): no config rule applies.
    cfg, bad = best_effort_config(run, catalog) if run.config_read else (None, set())
    ctx = Context(run, catalog, cfg, bad, max(1, gpus), Summary(processes=max(1, gpus)), resume=resume)
    ctx.backends, ctx.backends_partial = best_effort_backends(run)
    for rule in RULES:
        findings += _guarded(rule, ctx)
    return CheckReport(run, _dedupe(findings), ctx.summary, resume, ctx.scans)


def _guarded(rule: Callable[[Context], list[Finding]], ctx: Context) -> list[Finding]:
    """Run one rule; a bug in a rule becomes one finding instead of hiding every other finding."""
    try:
        return rule(ctx)
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("SD3TUNE_DEBUG"):
            raise
        return [error("sd3tune", rule.__name__, f"internal error while checking: {type(exc).__name__}: {exc}",
                      "please report it; SD3TUNE_DEBUG=1 shows the traceback")]


def _dedupe(findings: list[Finding]) -> list[Finding]:
    seen, out = set(), []
    for f in findings:
        if (f.severity, f.file, f.key, f.message) not in seen:
            seen.add((f.severity, f.file, f.key, f.message))
            out.append(f)
    return out


def best_effort_config(run: LoadedRun, catalog: Catalog) -> tuple[RunConfig | None, set[str]]:
    """``run.config``, or when it failed validation, the config without its invalid values (for the cross-checks,
    which then skip rules that involve the options returned as bad). Those values are already reported."""
    if run.config is not None or run.format is None:
        return run.config, set()
    args = with_simpletuner_defaults(run.args, catalog)
    # unset required options are reported; RunConfig's defaults stand in (rules on paths check the option is set)
    args.setdefault("output_dir", str(run.paths.output))
    args.setdefault("data_backend_config", str(run.paths.backends))
    bad: set[str] = set()
    for _ in range(len(keys.KEYS) + 8):
        try:
            return config_from_args(args), bad
        except ValidationError as exc:
            dropped = False
            for err in exc.errors():
                option = keys.option_for_path(err["loc"])
                if option and option in args:
                    bad.add(option)
                    del args[option]
                    dropped = True
            if not dropped:
                return None, bad
    return None, bad


def best_effort_backends(run: LoadedRun) -> tuple[list[ImageBackend | TextEmbedsBackend] | None, bool]:
    """``run.backends``, or when they failed validation, each dataset without its invalid keys (entries missing a
    required key are left out), so that the data checks still run. Returns (backends, partial)."""
    if run.backends is not None or run.backend_entries is None:
        return run.backends, False
    out, partial = [], False
    for entry in run.backend_entries:
        entry = dict(entry) if isinstance(entry, dict) else {}
        for _ in range(len(entry) + 1):
            try:
                out.append(BACKEND_LIST.validate_python([entry])[0])
                break
            except ValidationError as exc:
                partial = True
                fields = {str(e["loc"][2]) for e in exc.errors() if len(e["loc"]) > 2}
                removable = (fields & set(entry)) - {"id", "dataset_type"}
                if not removable:
                    break
                for name in removable:
                    del entry[name]
    return out, partial


RULES: tuple[Callable[[Context], list[Finding]], ...] = (
    check_extra_options, check_traps, check_steps, check_training, check_model, check_paths,
    check_backends, check_model_sizes, check_environment,
)

