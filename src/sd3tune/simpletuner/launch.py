"""How SimpleTuner is launched: ``accelerate launch <simpletuner>/train.py`` as data (argv + env + cwd), built by a
pure function, and a runner that streams its output into a log and a progress callback.

SimpleTuner reads ``config/config.env`` relative to its working directory and also reads every mapped key
(``MODEL_NAME``, ``OUTPUT_DIR``, ``ENV``...) from the process environment, so the child gets a scrubbed
environment: an allow-list of system and credential variables, never a SimpleTuner key.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

from sd3tune.errors import Sd3tuneError
from sd3tune.simpletuner import keys
from sd3tune.simpletuner.catalog import load_catalog
from sd3tune.simpletuner.compat import ALPHA_BACKGROUND_ENV, CUDA_GRAPHS_ENV, LAUNCHED_ENV, SITE_DIR, die_with_parent

# Variables the child may inherit: system basics, GPU/NCCL plumbing, Hub and W&B credentials and caches.
PASSTHROUGH = {
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TERM", "TZ", "TMPDIR", "COLUMNS",
    "LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT",
    "HF_HUB_ENABLE_HF_TRANSFER",
    "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "XDG_CACHE_HOME",
    "WANDB_API_KEY", "WANDB_MODE", "WANDB_ENTITY", "WANDB_DIR", "WANDB_BASE_URL",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
    "http_proxy", "https_proxy", "no_proxy", "VIRTUAL_ENV",
    "SIMPLETUNER_LOG_LEVEL",  # DEBUG: SimpleTuner's debug.log in the run folder says which dataset gave each batch
}
SECRETS = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY"}  # passed on, never printed
# ... and PyTorch's compiler settings (TORCHINDUCTOR_CACHE_DIR keeps compiled kernels across runs, TORCH_LOGS, ...).
PASSTHROUGH_PREFIXES = ("LC_", "NCCL_", "MASTER_", "ACCELERATE_LOG", "TORCHINDUCTOR_", "TORCHDYNAMO_", "TRITON_",
                        "TORCH_")


def train_script() -> Path:
    """SimpleTuner's ``train.py`` (its ``simpletuner-train`` console script is broken in 4.10.1)."""
    spec = importlib.util.find_spec("simpletuner")
    if spec is None or spec.origin is None:
        raise Sd3tuneError("SimpleTuner is not installed in this environment", hint="run `uv sync` in the sd3tune folder")
    return Path(spec.origin).parent / "train.py"


def child_environment(environ: Mapping[str, str], config_format: str) -> dict[str, str]:
    """The training process's environment: the allow-list from ``environ``, minus any SimpleTuner key."""
    forbidden = load_catalog().environment_variables()
    env = {k: v for k, v in environ.items()
           if (k in PASSTHROUGH or k.startswith(PASSTHROUGH_PREFIXES)) and k not in forbidden}
    env.setdefault("PATH", os.defpath)
    env[keys.CONFIG_BACKEND_VAR] = config_format
    # compat fixes first (applied in the training process only), then the user's own PYTHONPATH, if any: packages
    # installed with `pip install --target DIR` must stay importable by SimpleTuner
    env["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), *[p for p in environ.get("PYTHONPATH", "").split(os.pathsep)
                                                          if p]])
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass(frozen=True)
class LaunchPlan:
    argv: list[str]
    env: dict[str, str]
    cwd: Path

    def shell(self) -> str:
        """A copy-pasteable shell line that runs exactly this launch. Credentials are not printed: the line takes
        them from the shell it is pasted into (``HF_TOKEN="$HF_TOKEN"``)."""
        env = " ".join(f'{k}="${k}"' if k in SECRETS else f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"cd {shlex.quote(str(self.cwd))} && env -i {env} {shlex.join(self.argv)}"


def build_launch(run_dir: Path, config_format: str, mixed_precision: str, gpus: int = 1,
                 accelerate_config: Path | None = None, extra_accelerate_args: Iterable[str] = (),
                 environ: Mapping[str, str] | None = None, python: str | None = None,
                 cuda_graphs: bool = False, alpha_background: str | None = None) -> LaunchPlan:
    """The exact ``accelerate launch`` command for a run (pure: reads nothing but its arguments). ``alpha_background``
    (``#rrggbb``): the colour the training process composites images with transparency on (compat fix 16)."""
    if gpus < 1:
        raise Sd3tuneError(f"--gpus {gpus} must be at least 1", hint="use --gpus 1 for one GPU")
    argv = [python or sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config is not None:
        argv += ["--config_file", str(accelerate_config)]
        if gpus > 1:
            argv += [f"--num_processes={gpus}"]
    else:
        argv += [f"--num_processes={gpus}", "--num_machines=1", f"--mixed_precision={mixed_precision}",
                 "--dynamo_backend=no"]
        if gpus > 1:
            argv += ["--multi_gpu"]
    argv += list(extra_accelerate_args)
    argv.append(str(train_script()))
    env = child_environment(os.environ if environ is None else environ, config_format)
    if cuda_graphs:
        env[CUDA_GRAPHS_ENV] = "1"
    if alpha_background and alpha_background.startswith("#"):
        env[ALPHA_BACKGROUND_ENV] = alpha_background
    return LaunchPlan(argv, env, Path(run_dir).resolve())


# ------------------------------------------------------------------------------------------------ running

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_STEP = re.compile(r"Steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)\s*\[([^<\]]*)<([^,\]]*)(?:,\s*([\d.]+)\s*(s/it|it/s))?"
                   r"(?:[^\]]*?lr=([\d.e+-]+))?(?:[^\]]*?step_loss=([\d.e+-]+|nan))?")


@dataclass
class Progress:
    step: int
    total: int
    elapsed: str
    eta: str
    seconds_per_step: float | None
    loss: float | None
    lr: float | None
    since_launch: float | None = None  # seconds since the launch (run_plan's clock), when it is known


def parse_progress(line: str) -> Progress | None:
    """Read SimpleTuner's tqdm line ``Epoch 1/1, Steps: 25%|..| 1/4 [00:09<00:29, 9.82s/it, lr=.., step_loss=..]``."""
    m = _STEP.search(_ANSI.sub("", line))
    if not m:
        return None
    rate = float(m.group(5)) if m.group(5) else None
    if rate is not None and m.group(6) == "it/s":
        rate = 1.0 / rate if rate else None
    return Progress(int(m.group(1)), int(m.group(2)), m.group(3).strip(), m.group(4).strip(), rate,
                    float(m.group(8)) if m.group(8) else None, float(m.group(7)) if m.group(7) else None)


# SimpleTuner's log lines that start a phase worth telling the user about (the minute before step 1 on SD3M).
PHASES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"Loading AutoencoderKL"), "loading the VAE"),
    (re.compile(r"Loading (CLIP|T5).* text encoder"), "loading the text encoders"),
    (re.compile(r"Initialise text embed pre-computation|Pre-computing null embedding"), "caching text embeddings"),
    (re.compile(r"Executing VAE cache update|Creating VAE latent cache"), "caching VAE latents"),
    (re.compile(r"Loading diffusion model"), "loading the SD3 transformer"),
    (re.compile(r"Saving current state to (.+?)\s*$"), "saving {0}"),  # a run folder may have spaces
    # accelerate's load_state, which SimpleTuner calls to resume (its own "Resuming from" line is not logged)
    (re.compile(r"Loading states from (?:.*/)?(checkpoint-(\d+))\s*$"), "resuming from {0} (step {1})"),
)


def phase_of(line: str) -> str | None:
    """A short description of the phase a SimpleTuner log line starts, or None."""
    line = clean_line(line)
    for pattern, text in PHASES:
        m = pattern.search(line)
        if m:
            return text.format(*(Path(g).name for g in m.groups()))
    return None


_GRAPHS = re.compile(r"sd3tune cuda-graphs: (.+)$")  # compat/cuda_graphs.py's log lines (train --cuda-graphs)


def cuda_graphs_message(line: str) -> str | None:
    """What the training process said about replaying CUDA graphs in this log line, or None."""
    m = _GRAPHS.search(clean_line(line))
    return m.group(1) if m else None


_FIX_NOT_APPLIED = re.compile(r"sd3tune: (fix \S+ did not apply: .+)$")  # compat's skipped fixes (compat/__init__.py)


def fix_not_applied_message(line: str) -> str | None:
    """``fix <name> did not apply: <why>`` when this log line says one of sd3tune's compat fixes was skipped."""
    m = _FIX_NOT_APPLIED.search(clean_line(line))
    return m.group(1) if m else None


_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)):\s*(.*)$")


def failure_reason(lines: list[str]) -> str:
    """The child's last exception line (``OSError: ...``), skipping accelerate's own wrapper error."""
    for line in reversed(lines):
        m = _EXCEPTION.match(line.strip())
        if m and "CalledProcessError" not in m.group(1):
            return f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2)}".strip()
    return lines[-1] if lines else "no output"


def clean_line(line: str) -> str:
    return _ANSI.sub("", line).strip()


@dataclass
class RunOutcome:
    returncode: int
    interrupted: bool
    last_progress: Progress | None
    tail: list[str] = field(default_factory=list)
    signal: str | None = None  # what stopped an interrupted training: SIGINT, SIGTERM or SIGHUP


def _say(text: str) -> None:
    """A line on stderr from a signal handler: os.write (the handler may run inside a write to sys.stderr); a
    terminal gone with the SIGHUP that brought us here is no error."""
    try:
        os.write(2, f"\n{text}\n".encode())
    except OSError:
        pass


class StopSignals:
    """SIGINT (Ctrl-C), SIGTERM (``kill``, ``timeout``, a cancelled job) and SIGHUP (a closed terminal or SSH session)
    while a training runs, as a context manager around the run and its record.

    The first signal starts one orderly stop: ``KeyboardInterrupt`` in the run, which stops the trainer's process
    group (``_stop``). Every later signal is absorbed, so the stop, the stamping and the record finish ("stopping,
    please wait", said once): ``uv run`` forwards one Ctrl-C as two SIGINTs. A third SIGINT within 5 s of the first
    kills the trainer at once (the interruption is still recorded). A signal ignored when sd3tune started (``nohup``,
    a script's background job) stays ignored. Outside the main thread nothing is installed."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.state = "idle"  # -> running (the trainer started) -> stopping | finished
        self.first: int | None = None  # the signal that stopped the training
        self.pending = False  # a signal came before the trainer started
        self.kill = False  # stop at once: SIGKILL
        self.sigints: list[float] = []
        self.said = False
        self._restore: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._restore[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._restore.items():
            signal.signal(sig, handler)
        self._restore.clear()

    def started(self) -> None:
        """The trainer runs: a signal now raises KeyboardInterrupt (one that came while it started, now)."""
        self.state = "running"
        if self.pending:
            self.state = "stopping"
            raise KeyboardInterrupt

    def _handle(self, signum, frame) -> None:
        import time

        if signum == signal.SIGINT:
            now = time.monotonic()
            self.sigints = [t for t in self.sigints if now - t < 5.0] + [now]
        if self.first is None:
            self.first = signum
        if self.state == "idle":
            self.pending = True
        elif self.state == "running":
            self.state = "stopping"
            raise KeyboardInterrupt
        elif self.state == "stopping" and len(self.sigints) >= 3 and not self.kill:
            self.kill = True
            _say("stopping now: killing the training")
        elif not self.said:
            self.said = True
            _say("stopping, please wait")


def run_plan(plan: LaunchPlan, log_path: Path, on_progress: Callable[[Progress], None] | None = None,
             on_line: Callable[[str], None] | None = None, tail_lines: int = 80,
             signals: StopSignals | None = None, clock_start: float | None = None) -> RunOutcome:
    """Run the plan; all output goes to ``log_path``; progress lines are parsed and reported, each with the seconds
    since ``clock_start`` (``time.monotonic()``; by default the launch).

    SIGINT, SIGTERM or SIGHUP stops the training process group, waits for it to stop, and reports ``interrupted``
    (``StopSignals``: pass one that also spans what the caller does with the outcome, else it spans the run alone).
    The trainer dies with sd3tune, even with a ``kill -9`` of sd3tune (``die_with_parent``).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if signals is not None:
        return _run(plan, log_path, on_progress, on_line, tail_lines, signals, clock_start)
    with StopSignals() as own:
        return _run(plan, log_path, on_progress, on_line, tail_lines, own, clock_start)


def _child_setup(parent: int) -> None:
    """In the launcher, between fork and exec: it leads its own session (start_new_session) so that a stop reaches
    every process of the launch, dies with sd3tune, and takes SIGINT and SIGTERM at their defaults even where
    sd3tune started with them ignored (a script's ``cmd &``)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(parent)


def _run(plan: LaunchPlan, log_path: Path, on_progress: Callable[[Progress], None] | None,
         on_line: Callable[[str], None] | None, tail_lines: int, signals: StopSignals,
         clock_start: float | None) -> RunOutcome:
    import time

    last: Progress | None = None
    tail: list[str] = []
    interrupted = False
    parent = os.getpid()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(plan.argv, cwd=plan.cwd, env={**plan.env, LAUNCHED_ENV: str(parent)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=lambda: _child_setup(parent))
        assert proc.stdout is not None
        clock_start = time.monotonic() if clock_start is None else clock_start
        buffer = b""
        try:
            signals.started()
            while True:
                chunk = proc.stdout.read1(65536)  # type: ignore[attr-defined]
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                buffer += chunk
                *pieces, buffer = re.split(rb"[\r\n]", buffer)
                for piece in pieces:
                    text = piece.decode("utf-8", "replace")
                    progress = parse_progress(text)
                    if progress is not None:
                        progress.since_launch = time.monotonic() - clock_start
                        if last is None or (progress.step, progress.loss) != (last.step, last.loss):
                            last = progress
                            if on_progress:
                                on_progress(progress)
                        continue
                    cleaned = clean_line(text)
                    if cleaned:
                        tail = (tail + [cleaned])[-tail_lines:]
                        if on_line:
                            on_line(cleaned)
            proc.wait()
            signals.state = "finished"
        except KeyboardInterrupt:
            interrupted = True
            signals.state = "stopping"
            _stop(proc, signals)
            signals.state = "finished"
    stopped_by = signal.Signals(signals.first).name if interrupted and signals.first else None
    return RunOutcome(proc.returncode if not interrupted else 130, interrupted, last, tail,
                      stopped_by or ("SIGINT" if interrupted else None))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a reused id owned by someone else
        return False
    return True


def _stop(proc: subprocess.Popen, signals: StopSignals) -> None:
    """Stop the launcher and every process it started (its own session): SIGINT, then SIGTERM, then SIGKILL, each
    after the last one's grace; SIGKILL at once when ``signals`` says so. Never cut short by another interrupt."""
    while True:
        try:
            _stop_group(proc, signals)
            return
        except KeyboardInterrupt:  # not from StopSignals (it absorbs them while stopping): stop at once
            signals.kill = True


def _stop_group(proc: subprocess.Popen, signals: StopSignals) -> None:
    import time

    pgid = proc.pid  # start_new_session=True made the launcher its group's leader
    for sig, grace in ((signal.SIGINT, 30.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if signals.kill and sig != signal.SIGKILL:
            continue
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(pgid):
                return
            if signals.kill and sig != signal.SIGKILL:
                break
            time.sleep(0.1)
    proc.wait()
