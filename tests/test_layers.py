"""The house's layers: the import graph of src/sd3tune has no upward arrow, and no module is over 400 lines.

Bottom up:

- the leaves: ``sd3tune`` (the package: ``__version__``), ``errors``, ``findings``, ``defaults``, ``fsutil`` and
  ``config/*``; they import no other sd3tune module but each other;
- ``simpletuner/``: SimpleTuner's files, options and process; it imports only itself and the leaves;
- the domain modules (``checks/``, ``lora``, ``inference``, ``evaluation``, ``report``, ...): never a command, never
  the CLI;
- ``commands/``: one module per command, and ``options.py`` that they all may share; a command imports no other
  command, except ``quickstart``, the whole loop (init, train, generate);
- ``cli.py``: the app, which loads each command by its name when it runs.

Every import of an sd3tune module counts: at the top of a module, inside a function, under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "sd3tune"
MAX_LINES = 400
# Modules allowed over MAX_LINES, each because one concern needs the length (with the reason): none today.
LONG_MODULES: dict[str, str] = {}

LEAVES = {"sd3tune", "sd3tune.errors", "sd3tune.findings", "sd3tune.defaults", "sd3tune.fsutil"}
QUICKSTART_USES = {"sd3tune.commands.init", "sd3tune.commands.train", "sd3tune.commands.generate"}
SHARED_OPTIONS = "sd3tune.commands.options"
ENTRY_POINT = "sd3tune.__main__"  # `python -m sd3tune`: runs the CLI


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the sd3tune module imported
    line: int
    text: str  # the statement, as written

    def __str__(self) -> str:
        return f"{self.module} (line {self.line}: {self.text}) imports {self.target}"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def imports_in(source: str, module: str, is_package: bool, known: set[str]) -> list[Import]:
    """Every import of an sd3tune module in ``source`` (the text of ``module``), wherever it is written. ``from A
    import B`` imports ``A.B`` when that is a module in ``known``, else ``A``; relative imports are resolved."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            targets = [node.args[0].value]
        text = ast.get_source_segment(source, node) if targets else None
        for target in dict.fromkeys(targets):
            if _in(target, "sd3tune"):
                found.append(Import(module, target, node.lineno, " ".join((text or "").split())))
    return found


def all_imports() -> list[Import]:
    modules = all_modules()
    known = set(modules)
    return [imp for name, path in modules.items()
            for imp in imports_in(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", known)]


def is_leaf(module: str) -> bool:
    return module in LEAVES or _in(module, "sd3tune.config")


def is_command(module: str) -> bool:
    return module.startswith("sd3tune.commands.")


def _report(violations: list[str], rule: str) -> str:
    return f"{rule}:\n  " + "\n  ".join(violations)


# ----------------------------------------------------------------------------------------------- the scanner


def test_the_scanner_sees_every_kind_of_import():
    source = ("import os\nimport sd3tune.errors\nfrom sd3tune import __version__\nfrom sd3tune.simpletuner import keys\n"
              "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sd3tune.lora import LoraSource\n"
              "def f():\n    from ..report import fmt\n    from . import candidates\n"
              "    importlib.import_module('sd3tune.commands.check')\n")
    known = {"sd3tune.simpletuner.keys", "sd3tune.checks.candidates"}
    found = {(i.target, i.line) for i in imports_in(source, "sd3tune.checks.engine", False, known)}
    assert found == {("sd3tune.errors", 2), ("sd3tune", 3), ("sd3tune.simpletuner.keys", 4), ("sd3tune.lora", 7),
                     ("sd3tune.report", 9), ("sd3tune.checks.candidates", 10), ("sd3tune.commands.check", 11)}
    assert {i.target for i in imports_in("from . import x\n", "sd3tune.checks", True, {"sd3tune.checks.x"})} == {
        "sd3tune.checks.x"}
    assert all_imports(), "no import found in src/sd3tune: the scanner reads nothing"


# ----------------------------------------------------------------------------------------------- the rules


def test_simpletuner_imports_only_itself_and_the_leaves():
    bad = [str(i) for i in all_imports()
           if _in(i.module, "sd3tune.simpletuner") and not _in(i.target, "sd3tune.simpletuner") and not is_leaf(i.target)]
    assert not bad, _report(bad, "sd3tune.simpletuner may import only itself and the leaves "
                                 f"({', '.join(sorted(LEAVES))}, sd3tune.config.*)")


def test_nothing_below_the_commands_imports_a_command_or_the_cli():
    bad = [str(i) for i in all_imports()
           if (_in(i.target, "sd3tune.commands") or i.target == "sd3tune.cli")
           and not (_in(i.module, "sd3tune.commands") or i.module == "sd3tune.cli")
           and not (i.module == ENTRY_POINT and i.target == "sd3tune.cli")]
    assert not bad, _report(bad, "only sd3tune.commands.* and sd3tune.cli may import a command or the CLI (move the "
                                 "shared thing down into a domain module)")


def test_a_command_imports_no_other_command():
    bad = [str(i) for i in all_imports()
           if is_command(i.module) and is_command(i.target) and i.target not in (i.module, SHARED_OPTIONS)
           and not (i.module == "sd3tune.commands.quickstart" and i.target in QUICKSTART_USES)]
    assert not bad, _report(bad, "a command may import commands/options.py, but no other command (quickstart: "
                                 "also init, train, generate); move what they share down into a domain module")


def test_the_leaves_import_only_each_other():
    bad = [str(i) for i in all_imports() if is_leaf(i.module) and not is_leaf(i.target)]
    assert not bad, _report(bad, f"the leaves ({', '.join(sorted(LEAVES))}, sd3tune.config.*) may import only "
                                 "each other")


def test_no_module_is_over_400_lines():
    modules = all_modules()
    assert set(LONG_MODULES) <= set(modules), f"LONG_MODULES names no module: {set(LONG_MODULES) - set(modules)}"
    lengths = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules.items()}
    bad = [f"{name} ({modules[name].relative_to(SRC)}): {n} lines" for name, n in lengths.items()
           if n > MAX_LINES and name not in LONG_MODULES]
    assert not bad, _report(bad, f"a module holds one concern in at most {MAX_LINES} lines: split it")


def test_the_readme_layout_names_every_module_and_only_modules_that_exist():
    """README.md's "Layout" block lists src/sd3tune: every module and folder it names exists, and every module of the
    package, of commands/ and of simpletuner/ is named there (a line's names come before its description)."""
    import re

    readme = (SRC.parent / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    named: set[Path] = set()
    folder = None
    lines = block.splitlines()
    for line in lines[lines.index("src/sd3tune/") + 1:]:
        indent = len(line) - len(line.lstrip())
        if indent == 0:  # past src/sd3tune/
            break
        words = re.split(r"\s{2,}", line.strip())[0].split()
        if indent == 2:
            folder = None
        for word in words:
            if word.endswith("/"):
                path = PACKAGE / folder / word if folder and indent > 2 else PACKAGE / word
                assert path.is_dir(), f"README.md's Layout names {path.relative_to(SRC)}/, which does not exist"
                if indent == 2:
                    folder = word.rstrip("/")
            elif word.endswith(".py"):
                path = PACKAGE / folder / word if folder and indent > 2 else PACKAGE / word
                assert path.is_file(), f"README.md's Layout names {path.relative_to(SRC)}, which does not exist"
                named.add(path)
    for where in (PACKAGE, PACKAGE / "commands", PACKAGE / "simpletuner"):
        missing = [str(p.relative_to(SRC)) for p in sorted(where.glob("*.py"))
                   if p.name not in ("__init__.py", "__main__.py") and p not in named]
        assert not missing, f"README.md's Layout does not name {missing}"
