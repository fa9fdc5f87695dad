"""The package's architecture, read from its source: the import graph has no cycle, no long chains, and each
stage folder imports only from itself and from the stages below it.

Every import counts, at module level and inside functions alike (a deferred import still ties two modules
together); `from . import x` and `from .x import y` resolve to the modules they name.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

PACKAGE = "unet_trainer"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# The stages, lowest first: a module of one stage may import from its own stage and from the stages before it.
STAGES = ("core", "data", "models", "evaluation", "training", "config", "commands", "cli")
# The longest chain: at most 8 modules. The levels, top down: the command line (cli.*, 8); the commands that
# compose others (commands.cv, commands.predict, 7); the ones they compose (commands.evaluate, commands.loading,
# commands.train, 6); the composition root and the project's config (commands.builders, commands.datasets,
# commands.resume, config.config, 5); the registries (config.components, data.layouts, training.augment, 4); then the stages'
# own modules (3 and below; tests/test_import_depth.py gives each stage its budget).
MAX_DEPTH = 8


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@lru_cache(maxsize=1)
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module a dotted name stands for: itself, or the nearest enclosing module (a name imported
    from a module); None for names outside the package."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, modules)
                if target:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            for alias in node.names:
                # `from pkg import sub` names a module; `from mod import thing` names something in a module.
                target = _resolve(f"{prefix}.{alias.name}", modules) or _resolve(prefix, modules)
                if target:
                    found.add(target)
    found.discard(module)
    return found


@lru_cache(maxsize=1)
def import_graph() -> dict[str, frozenset[str]]:
    """Each module of the package and the package modules it imports (at any level of its code)."""
    modules = _modules()
    return {m: frozenset(_imports(m, p, modules)) for m, p in modules.items()}


def find_cycles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def longest_chain(graph: dict[str, frozenset[str]]) -> list[str]:
    """The longest import chain (modules each importing the next), its length in levels being the number of
    modules in it. Each cycle counts as one level (the chain runs on the graph with every cycle contracted to
    its first module), so that the depth is defined before the cycles are gone too."""
    representative = {m: m for m in graph}
    for component in find_cycles(graph):
        for m in component:
            representative[m] = component[0]
    contracted: dict[str, set[str]] = {representative[m]: set() for m in graph}
    for m, targets in graph.items():
        contracted[representative[m]] |= {representative[t] for t in targets} - {representative[m]}
    best: dict[str, list[str]] = {}

    def chain(v: str) -> list[str]:
        if v not in best:
            longest = max((chain(w) for w in sorted(contracted[v])), key=len, default=[])
            best[v] = [v, *longest]
        return best[v]

    return max((chain(v) for v in sorted(contracted)), key=len)


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def stage_violations(graph: dict[str, frozenset[str]]) -> list[str]:
    """Every import of a stage module that reaches above its stage, or out of the stages altogether."""
    found = []
    for module, targets in sorted(graph.items()):
        stage = _stage(module)
        if stage is None:
            continue
        for target in sorted(targets):
            target_stage = _stage(target)
            if target_stage is None:
                if target != PACKAGE:
                    found.append(f"{module} -> {target} (outside the stages)")
            elif STAGES.index(target_stage) > STAGES.index(stage):
                found.append(f"{module} -> {target} ({stage} below {target_stage})")
    return found


def report() -> str:
    graph = import_graph()
    chain = longest_chain(graph)
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in _modules().items()}
    largest = max(sizes, key=sizes.get)
    return (
        f"modules: {len(graph)}; cycles: {find_cycles(graph)}; depth: {len(chain)} ({' -> '.join(chain)}); "
        f"largest: {largest} ({sizes[largest]} lines)"
    )


def test_the_graph_reads_every_module():
    graph = import_graph()
    assert f"{PACKAGE}.data.loader" in graph
    # A checker that sees no edges cannot fail: the package's modules do import one another.
    assert sum(len(t) for t in graph.values()) > len(graph)
    print(report())


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, f"import cycles: {cycles}"


def test_import_chains_are_short():
    chain = longest_chain(import_graph())
    assert len(chain) <= MAX_DEPTH, f"{len(chain)} levels: {' -> '.join(chain)}"


def test_every_module_lives_in_a_stage():
    strays = [m for m in import_graph() if m != PACKAGE and _stage(m) is None]
    assert not strays, f"modules outside the stage folders {STAGES}: {strays}"


def test_stages_import_only_downwards():
    violations = stage_violations(import_graph())
    assert not violations, "\n".join(violations)


def test_the_checker_sees_a_cycle_and_an_upward_import():
    graph = {
        f"{PACKAGE}.core.a": frozenset({f"{PACKAGE}.cli.b"}),
        f"{PACKAGE}.cli.b": frozenset({f"{PACKAGE}.core.a"}),
    }
    assert find_cycles(graph) == [sorted(graph)]
    assert stage_violations(graph) == [f"{PACKAGE}.core.a -> {PACKAGE}.cli.b (core below cli)"]
    assert len(longest_chain({"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset()})) == 3
