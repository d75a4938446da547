"""Fix 18 (start-up time): transformers and diffusers each call ``importlib.metadata.packages_distributions()`` as
they are imported (their ``utils/import_utils.py``), and Python 3.12's version infers the top-level names of every
wheel without a ``top_level.txt`` (~110 here) by checking that each file its RECORD lists exists (~23,000 stat calls):
~0.6 s of CPU, twice, in every training process and every preview. The same mapping, made once per process, with one
existence check per inferred name (a name counts when any of its files exists, as upstream). The mapping is the one
upstream makes (a test compares them on the installed environment)."""

from __future__ import annotations

import collections
import csv
import functools
import inspect
from pathlib import PurePosixPath

from sd3tune.simpletuner.compat._patching import expect, replace


def applies_to(metadata) -> str | None:
    for path, source in (("packages_distributions", ("_top_level_declared(dist) or _top_level_inferred(dist)",)),
                         ("_top_level_declared", ()), ("_top_level_inferred", ("dist.files",)),
                         ("Distribution.files", ()), ("Distribution._read_files_distinfo", ()),
                         ("Distribution._read_files_egginfo_installed", ()),
                         ("Distribution._read_files_egginfo_sources", ())):
        why = expect(metadata, path, source=source)
        if why:
            return why
    return None


def _top_level_inferred(dist) -> list[str]:
    """upstream's ``_top_level_inferred``: the first part of each existing file's path (a module's name for a file at
    the top), when importable (no dot)."""
    lines = dist._read_files_distinfo() or dist._read_files_egginfo_installed() or dist._read_files_egginfo_sources()
    groups: dict[str, list[str]] = {}
    for row in csv.reader(lines or ()):
        if not row:
            continue
        parts = PurePosixPath(row[0]).parts
        name = parts[0] if len(parts) > 1 else inspect.getmodulename(row[0])
        if name and "." not in name:
            groups.setdefault(name, []).append(row[0])
    return [name for name, files in groups.items() if any(dist.locate_file(f).exists() for f in files)]


def apply(metadata) -> None:
    def once(_upstream):
        @functools.cache
        def packages_distributions():
            found = collections.defaultdict(list)
            for dist in metadata.distributions():
                for name in metadata._top_level_declared(dist) or _top_level_inferred(dist):
                    found[name].append(dist.metadata["Name"])
            return dict(found)

        return lambda: {name: list(dists) for name, dists in packages_distributions().items()}  # callers' copies

    replace(metadata, "packages_distributions", once)
