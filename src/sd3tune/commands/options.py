"""Command-line options that several `sd3tune` commands take, and the Enums of options that take one of fixed values.

Each module in ``sd3tune.commands`` declares its own Typer command (its options and its printing); an option that
two commands share is written here once. An Enum option's values come from the code that uses them (runtime's
DEVICES, DTYPES, OFFLOADS; config.presets' PRESETS). Typer lists them in --help, and the option's parser refuses any
other value with the Sd3tuneError that the command's own check raises: one line naming the value, the choices and a
hint, exit code 2, the same words as from the Python API (Typer's own refusal is a usage error without the hint).
`evaluate --checkpoints` has its Enum beside its values in ``commands/evaluate.py`` (importing them here would
import that module, which imports this one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer

from sd3tune.config.presets import PRESETS
from sd3tune.errors import Sd3tuneError
from sd3tune.runtime import DEVICES, DTYPES, OFFLOADS, check_runtime_choices

E = TypeVar("E", bound=StrEnum)


def choices(name: str, values: Iterable[str]) -> type[StrEnum]:
    """A str Enum whose members are ``values``, each named as its value (``Device("cpu") is Device.cpu``)."""
    return StrEnum(name, [(value, value) for value in values])


def choice_parser(enum: type[E], refuse: Callable[[str], object]) -> Callable[[str | E], E]:
    """Typer's parser for an option of ``enum``'s values: the member of a value; any other value is refused by
    ``refuse(value)``, which raises the command's own Sd3tuneError."""

    def parse(value: str | E) -> E:
        try:
            return enum(value)
        except ValueError:
            refuse(str(value))
            raise Sd3tuneError(f"{value!r} is not one of {', '.join(enum)}") from None  # refuse let it pass

    return parse


def _refuse_preset(value: str) -> None:
    raise Sd3tuneError(f"unknown preset {value!r}", hint=f"use one of {', '.join(PRESETS)}")  # as init.build_run


def _refuse_format(value: str) -> None:
    raise Sd3tuneError(f"--format {value!r} is not env or json", hint="use --format env or --format json")


Device = choices("Device", DEVICES)
Dtype = choices("Dtype", DTYPES)
Offload = choices("Offload", OFFLOADS)
Preset = choices("Preset", PRESETS)
Format = choices("Format", ("env", "json"))  # InitOptions.format

parse_device = choice_parser(Device, lambda value: check_runtime_choices(value, "auto"))
parse_dtype = choice_parser(Dtype, lambda value: check_runtime_choices("auto", value))
parse_offload = choice_parser(Offload, lambda value: check_runtime_choices("auto", "auto", value))
parse_preset = choice_parser(Preset, _refuse_preset)
parse_format = choice_parser(Format, _refuse_format)

RunDir = Annotated[Path, typer.Argument(metavar="RUN_DIR", help="Run folder (holds config/, output/, cache/, logs/).")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="Base model: Hub id or local diffusers folder "
                                                                 "(default: the run's model, else SD3 Medium).")]

# The sampler's options, as generate and evaluate both take them
StepsOpt = Annotated[Optional[int], typer.Option("--steps", help="Sampling steps (default 28).")]
GuidanceOpt = Annotated[Optional[float], typer.Option("--guidance", help="CFG scale (default 7.0).")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="auto, cuda, mps or cpu.", parser=parse_device)]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="auto, bf16, fp16 or fp32.", parser=parse_dtype)]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Images per pipeline call.")]
