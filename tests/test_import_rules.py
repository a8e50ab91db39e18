"""The dependency rules of the README's Layout section, checked on the source with `ast` (every import, including
those inside functions, which is where circles hide).

- strategies (``foveate.agents``) never import training code (``foveate.rl``);
- tools and policies never import strategies; nothing imports ``foveate.rl`` except the CLI (``foveate.cli``,
  ``foveate.rl_cli``) and ``rl`` itself;
- the core (``foveate/*`` except the faces that pick a strategy by module: the CLI and ``foveate.vicrop_calibrate``)
  reaches strategies only through the registry: it may import ``foveate.agents`` (``get_builder``,
  ``STRATEGY_MODULES``) and ``foveate.agents.state`` (the run context), never a strategy module;
- no import circles between modules (a package's ``__init__`` counts as the package);
- no private name (``_x``) is imported from another module, anywhere in the repository (tests and bench too).

Each rule is a function of the import graph, so `test_rules_catch_a_violation` shows each one failing on a
deliberately broken graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source directory → the package it installs as (pyproject.toml's package-dir)
PACKAGES = {"foveate": "foveate", "agents": "foveate.agents", "tools": "foveate.tools",
            "policies": "foveate.policies", "rl": "foveate.rl", "configs": "foveate.configs"}  # fmt: skip
FACES_PICKING_MODULES = ("foveate.cli", "foveate.vicrop_calibrate")
CORE_MAY_IMPORT = ("foveate.agents", "foveate.agents.state")
RL_IMPORTERS = ("foveate.cli", "foveate.rl_cli", "foveate.rl")  # the CLI and its RL commands


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT)
    package = PACKAGES[relative.parts[0]]
    parts = [package, *relative.parts[1:-1]]
    if relative.stem != "__init__":
        parts.append(relative.stem)
    return ".".join(parts)


def source_files(directories=tuple(PACKAGES)) -> list[Path]:
    files = []
    for directory in directories:
        files += [p for p in (ROOT / directory).rglob("*.py") if "assets" not in p.parts]
    return sorted(files)


def imports_of(path: Path, module: str) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement of a file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.stem == "__init__"
    found = []
    for node in runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((base, [alias.name for alias in node.names]))
    return found


def runtime_nodes(node: ast.AST):
    """Every node of a tree except those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from (n for body in child.orelse for n in [body, *runtime_nodes(body)])
            continue
        yield child
        yield from runtime_nodes(child)


def import_graph(known: set[str], edges: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    """module → the known modules it imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    if edges is not None:
        return edges
    graph: dict[str, set[str]] = {}
    for path in source_files():
        module = module_name(path)
        targets = set()
        for base, names in imports_of(path, module):
            for name in names or [None]:
                candidate = f"{base}.{name}" if name else base
                if candidate in known:
                    targets.add(candidate)
                elif base in known:
                    targets.add(base)
        graph[module] = targets - {module}
    return graph


def known_modules() -> set[str]:
    return {module_name(path) for path in source_files()}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            if within(source, "foveate.agents") and within(target, "foveate.rl"):
                found.append(f"strategy imports training code: {source} → {target}")
            if (within(source, "foveate.tools") or within(source, "foveate.policies")) and within(
                target, "foveate.agents"
            ):
                found.append(f"tools/policies import strategies: {source} → {target}")
            if within(target, "foveate.rl") and not any(within(source, m) for m in RL_IMPORTERS):
                found.append(f"only the CLI imports training code: {source} → {target}")
            core = not any(within(source, p) for p in ("foveate.agents", "foveate.tools", "foveate.policies",
                                                        "foveate.rl", "foveate.configs"))  # fmt: skip
            picks = core and source not in FACES_PICKING_MODULES and within(target, "foveate.agents")
            if picks and target not in CORE_MAY_IMPORT:
                found.append(f"core imports a strategy module, not the registry: {source} → {target}")
    return found + [f"import circle: {' → '.join(cycle)}" for cycle in cycles(graph)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component) + [sorted(component)[0]])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def private_imports() -> list[str]:
    """``from module import _name`` anywhere in the repository (packages, tests, bench, examples)."""
    found = []
    skipped = (".venv", "build", "dist", ".git")
    tops = [p for p in ROOT.iterdir() if p.is_dir() and p.name not in skipped and not p.name.endswith(".egg-info")]
    for path in sorted([*ROOT.glob("*.py"), *(f for top in tops for f in top.rglob("*.py"))]):
        for base, names in imports_of(path, "_"):
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    found.append(f"{path.relative_to(ROOT)}: from {base} import {name}")
    return found


def test_dependency_rules_hold():
    problems = violations(import_graph(known_modules()))
    assert not problems, "\n".join(problems)


def test_no_private_name_is_imported_across_modules():
    problems = private_imports()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("edge", "message"),
    [
        (("foveate.agents.vicrop", "foveate.rl.sft"), "strategy imports training code"),
        (("foveate.policies.base", "foveate.agents.state"), "tools/policies import strategies"),
        (("foveate.eval.runner", "foveate.rl.sft"), "only the CLI imports training code"),
        (("foveate.eval.runner", "foveate.agents.vicrop"), "core imports a strategy module"),
        (("foveate.tools.crop", "foveate.tools.store"), "import circle"),
    ],
)
def test_rules_catch_a_violation(edge, message):
    graph = {module: set(targets) for module, targets in import_graph(known_modules()).items()}
    source, target = edge
    graph.setdefault(source, set()).add(target)
    if message == "import circle":
        graph.setdefault(target, set()).add(source)
    assert any(message in problem for problem in violations(graph))
