"""How many processes a training launches, on how many machines: from ``--gpus N`` or an accelerate config file (read
as accelerate reads it: YAML, or JSON for a ``.json`` file; ``accelerate/commands/config/config_args.py``), with the
``accelerate launch`` arguments after ``--`` taking precedence, as they do in accelerate's ``_validate_launch_command``.

Pure and light: no accelerate or torch import (``sd3tune check`` uses it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from sd3tune.errors import Sd3tuneError

ACCELERATE_HINT = "see configs/accelerate/ for working files, or write one with `accelerate config --config_file FILE`"


@dataclass(frozen=True)
class Processes:
    total: int  # processes in the whole job (accelerate's num_processes): the data-parallel world size
    machines: int = 1
    source: str = "--gpus"  # what set the count, for messages: "--gpus" or the accelerate file's name

    @property
    def here(self) -> int:
        """Processes (GPUs) on this machine."""
        return self.total // self.machines


def read_accelerate_file(path: Path) -> dict:
    """The accelerate config file as a mapping; a file accelerate could not read either is a user error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Sd3tuneError(f"accelerate config {path} cannot be read: {exc}", hint=ACCELERATE_HINT) from None
    import yaml

    try:
        data = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        first = " ".join(str(exc).split())
        raise Sd3tuneError(f"accelerate config {path} does not parse: {first}", hint=ACCELERATE_HINT) from None
    if not isinstance(data, dict):
        raise Sd3tuneError(f"accelerate config {path} does not parse: not a mapping of settings", hint=ACCELERATE_HINT)
    return data


def _launch_arg(args: list[str], name: str) -> str | None:
    """The value of ``--name`` (``--name V``, ``--name=V``, or with hyphens) in accelerate launch arguments."""
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    value = None
    for i, arg in enumerate(args):
        key, eq, rest = arg.partition("=")
        if key in spellings:
            value = rest if eq else (args[i + 1] if i + 1 < len(args) else None)
    return value


def _count(value, what: str, where: str, minimum: int = 1) -> int:
    try:
        n = int(value)
        if str(value).strip() != str(n) and not isinstance(value, int):
            raise ValueError
    except (TypeError, ValueError):
        raise Sd3tuneError(f"{where}: {what} is {value!r}, not a whole number", hint=ACCELERATE_HINT) from None
    if n < minimum:
        raise Sd3tuneError(f"{where}: {what} {n} must be at least {minimum}", hint=ACCELERATE_HINT)
    return n


def plan_processes(gpus: int = 1, accelerate_config: Path | None = None,
                   extra_accelerate_args: Iterable[str] = ()) -> Processes:
    """The job's processes and machines; every contradiction, and an accelerate file that is not there, a user error
    (before anything is launched). ``accelerate_config`` as the user wrote it (``~`` expanded here)."""
    if accelerate_config is not None:
        written, accelerate_config = accelerate_config, Path(accelerate_config).expanduser()
        if not accelerate_config.is_file():
            raise Sd3tuneError(f"accelerate config {written} is not a file",
                               hint="create one with `accelerate config --config_file FILE`")
    if gpus < 1:
        raise Sd3tuneError(f"--gpus {gpus} must be at least 1", hint="use --gpus 1 for one GPU")
    args = list(extra_accelerate_args)
    given = _launch_arg(args, "num_processes")
    if given is not None and (accelerate_config is None or gpus > 1) \
            and _count(given, "--num_processes", "accelerate launch arguments") != gpus:
        # accelerate takes the last --num_processes (sd3tune's own comes first), and without an accelerate file how
        # many processes it then starts depends on the GPUs it finds: refused rather than counted wrong
        raise Sd3tuneError(f"--num_processes {given} after `--` contradicts --gpus {gpus}",
                           hint=f"pass --gpus {given} instead (or num_processes in an --accelerate-config file)")
    if accelerate_config is None:
        machines = _launch_arg(args, "num_machines")
        if machines is not None and _count(machines, "--num_machines", "accelerate launch arguments") != 1:
            raise Sd3tuneError(f"--num_machines {machines} after `--` needs an accelerate config file naming the "
                               "machines", hint="pass --accelerate-config FILE (see configs/accelerate/multi_node.yaml)")
        return Processes(gpus)
    data = read_accelerate_file(accelerate_config)
    name = Path(accelerate_config).name
    machines = _count(data.get("num_machines", 1), "num_machines", name)
    given_machines = _launch_arg(args, "num_machines")
    if given_machines is not None and \
            _count(given_machines, "--num_machines", "accelerate launch arguments") != machines:
        raise Sd3tuneError(f"accelerate config {name} names {machines} machine{'s' * (machines != 1)} but the launch "
                           f"says --num_machines {given_machines}",
                           hint="make the file and the arguments after `--` agree")
    total = gpus if gpus > 1 else given or data.get("num_processes", 1)
    total = _count(total, "num_processes", name)
    if total % machines:
        raise Sd3tuneError(f"accelerate config {name}: {total} processes do not split evenly over {machines} "
                           "machines", hint="make num_processes a multiple of num_machines (processes on every machine)")
    rank = _launch_arg(args, "machine_rank") or data.get("machine_rank", 0)
    if _count(rank, "machine_rank", name, minimum=0) >= machines:
        raise Sd3tuneError(f"accelerate config {name}: machine_rank {rank} but the job has {machines} "
                           f"machine{'s' * (machines != 1)}", hint="machine ranks run 0 .. num_machines - 1")
    if machines > 1 and not (_launch_arg(args, "main_process_ip") or data.get("main_process_ip")):
        raise Sd3tuneError(f"accelerate config {name} names {machines} machines but no main_process_ip",
                           hint="set main_process_ip to the address of the machine of rank 0")
    return Processes(total, machines, name)
