"""The architecture as a test: the import graph of jobs/, pipeline/ and parallel/ has no cycle,
dependencies point one way (cli -> {local, slurm, bench} -> job -> output -> job core ->
pipeline -> parallel), and the commands that do not generate never import torch or diffusers.

Every import counts, also those inside functions (lazy) and under TYPE_CHECKING: a lazy import
is still a dependency, and the circle this test was written against (launch -> slurm ->
slurm_task -> launch) was made of lazy ones.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("jobs", "pipeline", "parallel")

LAYERS = {
    "parallel": set(),
    "pipeline": {"parallel"},
    "jobs core": {"pipeline", "parallel"},
    "jobs.output": {"jobs core", "pipeline", "parallel"},
    "jobs.job": {"jobs.output", "jobs core", "pipeline", "parallel"},
    "jobs.local": {"jobs.job", "jobs.output", "jobs core", "pipeline", "parallel"},
    "jobs.slurm": {"jobs.local", "jobs.job", "jobs.output", "jobs core", "pipeline", "parallel"},
    "jobs.bench": {"jobs core", "pipeline", "parallel"},
    "jobs.dry_run": {"jobs.slurm", "jobs.job", "jobs.output", "jobs core", "pipeline", "parallel"},
    "jobs.cli": {"jobs.dry_run", "jobs.local", "jobs.slurm", "jobs.bench", "jobs.job", "jobs.output",
                 "jobs core", "pipeline", "parallel"},  # fmt: skip
}
"""Layer -> the layers its modules may import (besides their own). A SLURM task is a local run
on its node, so jobs.slurm may use jobs.local, never the other way round."""


def layer(module: str) -> str:
    """The layer of a module: its package, or for a top-level module of jobs/ the module
    itself (cli, dry_run, job) or "jobs core" (config, errors, manifest, rows, seeds, plan...)."""
    top = module.split(".")[0]
    if top != "jobs":
        return top
    parts = module.split(".")
    if len(parts) > 1 and (ROOT / "jobs" / parts[1]).is_dir():
        return f"jobs.{parts[1]}"
    return module if module in LAYERS else "jobs core"


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(module: str, path: Path, known: Iterable[str]) -> set[str]:
    """Project modules that ``module`` imports anywhere in its file (``from a.b import c`` is
    a.b.c when that is a module, else a.b; relative imports are resolved)."""
    known = set(known)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for name in names:
            while name and name not in known:  # "jobs.output.store.OutputDir" -> the module
                name = name.rpartition(".")[0]
            if name and name != module and name.split(".")[0] in PACKAGES:
                found.add(name)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    return {m: imports_of(m, p, files) for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative DFS, three colours)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: finished
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                state[node] = 2
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in sorted(graph.items()):
        for dep in sorted(deps):
            a, b = layer(module), layer(dep)
            if a != b and b not in LAYERS[a]:
                bad.append(f"{module} ({a}) imports {dep} ({b})")
    return bad


def test_every_module_is_in_a_known_layer() -> None:
    graph = import_graph()
    assert len(graph) > 40
    assert {layer(m) for m in graph} <= set(LAYERS)
    assert layer("jobs.output.store") == "jobs.output" and layer("jobs.plan") == "jobs core"
    assert layer("jobs.cli") == "jobs.cli" and layer("pipeline.samples") == "pipeline"


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_dependencies_point_one_way() -> None:
    graph = import_graph()
    assert not [(m, d) for m, ds in graph.items() for d in ds
                if layer(m) in ("pipeline", "parallel") and d.startswith("jobs")], "pipeline/parallel import jobs"  # fmt: skip
    assert layer_violations(graph) == []


def _tree_with(tmp_path: Path, edits: dict[str, str]) -> Path:
    """A copy of the packages with ``edits`` (module file -> a line appended)."""
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            target = tmp_path / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(path.read_text())
    for rel, line in edits.items():
        target = tmp_path / rel
        target.write_text(target.read_text() + "\n\ndef _late():\n    " + line + "\n")
    return tmp_path


def test_a_cycle_or_an_upward_import_is_caught(tmp_path: Path) -> None:
    """The checks can fail: a lazy import of the launcher from the plan closes a cycle
    (jobs.local.launch -> jobs.plan -> jobs.local.launch), and pipeline importing jobs or the
    output layer importing the SLURM layer breaks the direction."""
    tree = _tree_with(tmp_path, {
        "jobs/plan.py": "from jobs.local.launch import run_batch  # noqa",
        "pipeline/loading.py": "from jobs.errors import JobError  # noqa",
        "jobs/output/status.py": "from jobs.slurm.params import SlurmOptions  # noqa",
    })  # fmt: skip
    graph = import_graph(tree)
    cycle = find_cycle(graph)
    assert cycle is not None and "jobs.plan" in cycle and "jobs.local.launch" in cycle
    bad = layer_violations(graph)
    assert "pipeline.loading (pipeline) imports jobs.errors (jobs core)" in bad
    assert "jobs.output.status (jobs.output) imports jobs.slurm.params (jobs.slurm)" in bad
    assert "jobs.plan (jobs core) imports jobs.local.launch (jobs.local)" in bad


def test_relative_and_from_package_imports_resolve(tmp_path: Path) -> None:
    pkg = tmp_path / "jobs" / "output"
    pkg.mkdir(parents=True)
    (tmp_path / "jobs" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from . import store\n")
    (pkg / "store.py").write_text("from ..plan import Shard\nfrom jobs import errors\n")
    (tmp_path / "jobs" / "plan.py").write_text("")
    (tmp_path / "jobs" / "errors.py").write_text("")
    for package in ("pipeline", "parallel"):
        (tmp_path / package).mkdir()
    graph = import_graph(tmp_path)
    assert graph["jobs.output"] == {"jobs.output.store"}
    assert graph["jobs.output.store"] == {"jobs.plan", "jobs.errors"}


LIGHT = ("jobs.cli", "jobs.dry_run", "jobs.job", "jobs.output.status", "jobs.slurm.params",
         "jobs.slurm.task", "jobs.manifest", "jobs.rows", "pipeline.loading", "pipeline.samples",
         "parallel.cpus")  # fmt: skip


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_import_no_torch(module: str) -> None:
    """What `gen status`, `gen batch --dry-run` and the job checks import stays off torch,
    diffusers and transformers (each costs seconds); torch comes in where generation starts."""
    code = (f"import sys, {module}; "
            "print(','.join(m for m in ('torch', 'diffusers', 'transformers', 'submitit') if m in sys.modules))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"{module} imports {proc.stdout.strip()}"
