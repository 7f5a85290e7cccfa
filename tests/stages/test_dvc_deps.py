"""The DVC stages' dependencies cover, by construction, every project module their command imports.

For every stage of dvc.yaml and study/dvc.yaml, the module defining the command (``adcm <name>``) is imported
in a fresh interpreter together with every project module it imports anywhere — at the top or inside its
command functions, where the stage modules import the library so that ``adcm --help`` starts without it —;
every file of the repository they load (src/adcm/…, stages/…) must be listed as a dependency of the stage,
itself or through a folder that contains it. ``stages/cli.py`` (which only registers
the commands) and the packages' ``__init__.py`` files are the ones every stage may leave out.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

PIPELINES = [ROOT / "dvc.yaml", ROOT / "study" / "dvc.yaml"]
REGISTRATION_ONLY = {"stages/cli.py", "src/adcm/__main__.py"}

_PROBE = """
import ast, importlib, importlib.util, json, sys
from pathlib import Path
root = Path(sys.argv[1]).resolve()
module = importlib.import_module(sys.argv[2])
for node in ast.walk(ast.parse(Path(module.__file__).read_text(encoding="utf-8"))):
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
    if isinstance(node, ast.ImportFrom):
        base = importlib.util.resolve_name("." * node.level + (node.module or ""), module.__package__)
        names.append(base)
        if base.split(".")[0] == "adcm" and hasattr(importlib.import_module(base), "__path__"):
            names += [f"{base}.{a.name}" for a in node.names if importlib.util.find_spec(f"{base}.{a.name}")]
    for name in names:
        if name.split(".")[0] == "adcm":
            importlib.import_module(name)
files = set()
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None)
    if path and Path(path).is_absolute():
        p = Path(path).resolve()
        if root in p.parents and ".venv" not in p.parts:
            files.add(p.relative_to(root).as_posix())
print(json.dumps(sorted(files)))
"""


def imported_files(module: str) -> set[str]:
    """Repository files (relative to the root) that importing ``module`` loads."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(ROOT), module], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return {f for f in json.loads(out.stdout) if f not in REGISTRATION_ONLY and not f.endswith("/__init__.py")}


def command_module(name: str) -> str:
    """The module that defines ``adcm <name>`` (a command or a command group)."""
    from adcm.stages.cli import app

    for command in app.registered_commands:
        if (command.name or command.callback.__name__) == name:  # type: ignore[union-attr]
            return command.callback.__module__  # type: ignore[union-attr]
    for group in app.registered_groups:
        if group.name == name:
            return group.typer_instance.registered_commands[0].callback.__module__  # type: ignore[union-attr]
    raise AssertionError(f"no command `adcm {name}`")


def stage_deps(pipeline: Path) -> dict[str, tuple[str, list[str]]]:
    """stage name → (command module, deps relative to the repository root) of a dvc.yaml."""
    stages = yaml.safe_load(pipeline.read_text())["stages"]
    wdir = pipeline.parent
    result = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        words = body["cmd"].split()
        assert words[0] == "adcm", f"{pipeline}: stage {name} does not run an adcm command"
        deps = [
            (wdir / str(d)).resolve().relative_to(ROOT).as_posix() for d in body.get("deps", []) if "${" not in str(d)
        ]
        result[name] = (command_module(words[1]), deps)
    return result


def uncovered(imported: set[str], deps: list[str]) -> list[str]:
    """Imported files that no dependency (a file, or a folder containing it) covers."""
    return sorted(f for f in imported if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))


@pytest.fixture(scope="module")
def imports() -> dict[str, set[str]]:
    modules = {m for p in PIPELINES for m, _ in stage_deps(p).values()}
    return {m: imported_files(m) for m in modules}


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_imported_module_is_a_dependency(pipeline: Path, imports: dict[str, set[str]]) -> None:
    for name, (module, deps) in stage_deps(pipeline).items():
        assert imports[module], f"{module} imported no project file"
        missing = uncovered(imports[module], deps)
        assert not missing, f"{pipeline.name}: stage {name} ({module}) misses deps {missing}"


def test_the_check_fails_when_a_dependency_is_removed(imports: dict[str, set[str]]) -> None:
    module, deps = stage_deps(ROOT / "dvc.yaml")["train"]
    assert not uncovered(imports[module], deps)
    for dep in [d for d in deps if d.startswith(("src/", "stages/"))]:
        assert uncovered(imports[module], [d for d in deps if d != dep]), f"removing {dep} went unnoticed"
    assert "src/adcm/nets/jvp.py" in imports[module]  # the JVP behind Eq. 10 is among the train stage's imports


def test_the_probe_sees_imports_inside_commands(imports: dict[str, set[str]]) -> None:
    """``adcm train`` imports its library modules inside the command; the probe must still find them."""
    module, _ = stage_deps(ROOT / "dvc.yaml")["train"]
    top_level = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print('adcm.train.runs' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert top_level.stdout.strip() == "False"
    assert "src/adcm/train/runs.py" in imports[module]
