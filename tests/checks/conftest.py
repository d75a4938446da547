"""The run every check test starts from: a valid run written by `run_init` on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd3tune.commands.init import run_init


@pytest.fixture()
def make_run(tiny_init_options):
    def make(fmt: str = "env") -> tuple[Path, Path]:
        tiny_init_options.format = fmt
        run_init(tiny_init_options)
        return tiny_init_options.run_dir, tiny_init_options.data

    return make
