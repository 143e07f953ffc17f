"""The house rules of the source tree, read with `ast` alone (no project module is imported):

- no file in model/, server/, weights/ over MAX_FILE_LINES lines, no function or method over MAX_FUNCTION_LINES:
  past that a reader can no longer hold it in view;
- no import cycle among the project's modules, counting imports inside functions (a cycle that a deferred import
  hides is still a cycle) but not those under `if TYPE_CHECKING:`, which never run;
- server/scheduler.py imports no torch, neither itself nor through what importing it runs: the scheduler's
  policy is plain Python, testable and importable without the tensor library.

Each failure lists every violation, naming the file, the function or the chain of modules.
"""

from __future__ import annotations

import ast
import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "server", "weights")
MAX_FILE_LINES = 350
MAX_FUNCTION_LINES = 60
SCHEDULER = "server.scheduler"


@dataclass(frozen=True)
class Import:
    """One module an import statement names, with where it is and whether it runs when its module is imported."""

    target: str  # absolute dotted name: a project module, or a third-party one such as torch.nn
    line: int
    at_import_time: bool  # False inside a function body, which runs only when called


@functools.cache
def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the project's packages (a package is its __init__.py)."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if any(part.startswith(".") for part in parts):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@functools.cache
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def is_type_checking(test: ast.expr) -> bool:
    """`TYPE_CHECKING` or `typing.TYPE_CHECKING` (or any `<module>.TYPE_CHECKING`)."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


class ImportCollector(ast.NodeVisitor):
    """The imports of one module, skipping `if TYPE_CHECKING:` bodies and marking those inside functions."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.function_depth = 0
        self.imports: list[Import] = []

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.function_depth += 1
        self.generic_visit(node)
        self.function_depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if not is_type_checking(node.test):
            self.generic_visit(node)
            return
        for statement in node.orelse:  # the `else:` of a TYPE_CHECKING block does run
            self.visit(statement)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self.absolute(node.module, node.level)
        submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in project_modules()]
        if len(submodules) < len(node.names):  # some names are attributes of `base` itself
            self.add(base, node.lineno)
        for submodule in submodules:
            self.add(submodule, node.lineno)

    def absolute(self, module: str | None, level: int) -> str:
        if level == 0:
            return module or ""
        parts = self.package.split(".")
        anchor = ".".join(parts[: len(parts) - (level - 1)])
        return f"{anchor}.{module}" if module else anchor

    def add(self, target: str, line: int) -> None:
        self.imports.append(Import(target, line, at_import_time=self.function_depth == 0))


@functools.cache
def imports_of(module: str) -> tuple[Import, ...]:
    path = project_modules()[module]
    collector = ImportCollector(module, is_package=path.name == "__init__.py")
    collector.visit(parsed(path))
    return tuple(collector.imports)


def project_module_of(target: str) -> str | None:
    """The project module an import names: the longest project module that `target` is or lies in, else None."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in project_modules():
            return name
    return None


def where(module: str, line: int) -> str:
    return f"{relative(project_modules()[module])}:{line}"


# --- sizes -------------------------------------------------------------------------------------------------------


def functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function and method with its qualified name (Class.method, outer.inner)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, f"{prefix}{node.name}.")
        else:
            yield from functions(node, prefix)


def test_no_file_is_over_the_line_limit() -> None:
    too_long = []
    for path in project_modules().values():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_FILE_LINES:
            too_long.append(f"{relative(path)}: {lines} lines")
    assert not too_long, f"files over {MAX_FILE_LINES} lines:\n  " + "\n  ".join(too_long)


def test_no_function_is_over_the_line_limit() -> None:
    too_long = []
    for path in project_modules().values():
        for name, node in functions(parsed(path)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                too_long.append(f"{relative(path)}:{node.lineno} {name}: {lines} lines")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines:\n  " + "\n  ".join(too_long)


# --- import cycles -----------------------------------------------------------------------------------------------


@functools.cache
def import_graph() -> dict[str, dict[str, int]]:
    """Project module -> {project module it imports: line of the first such import}, deferred imports included."""
    graph: dict[str, dict[str, int]] = {}
    for module in project_modules():
        edges: dict[str, int] = {}
        for found in imports_of(module):
            target = project_module_of(found.target)
            if target is not None:
                edges.setdefault(target, found.line)
        graph[module] = edges
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            successor = next(successors, None)
            if successor is not None:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                elif successor in on_stack:
                    low[node] = min(low[node], index[successor])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def cycle_through(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """One cycle inside a strongly connected component, as modules from its first member back to it."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first, so the cycle shown is a shortest one through `start`
        next_frontier = []
        for node in frontier:
            for successor in sorted(graph[node]):
                if successor == start:
                    return [*paths[node], start]
                if successor in members and successor not in paths:
                    paths[successor] = [*paths[node], successor]
                    next_frontier.append(successor)
        frontier = next_frontier
    raise AssertionError(f"no cycle in the component {component}")


def describe_cycle(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    steps = [cycle[0]]
    for source, target in itertools.pairwise(cycle):
        steps.append(f"{target} ({where(source, graph[source][target])})")
    return " -> ".join(steps)


def test_no_import_cycle() -> None:
    graph = import_graph()
    cycles = [
        describe_cycle(graph, cycle_through(graph, component))
        for component in strongly_connected(graph)
        if len(component) > 1 or component[0] in graph[component[0]]
    ]
    assert not cycles, "import cycles (module -> imported module (where)):\n  " + "\n  ".join(cycles)


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"e": 5}}
    components = [c for c in strongly_connected(graph) if len(c) > 1 or c[0] in graph[c[0]]]
    assert sorted(components) == [["a", "b", "c"], ["e"]]
    assert cycle_through(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]


# --- a scheduler without torch -----------------------------------------------------------------------------------


def is_torch(target: str) -> bool:
    """torch itself, or a module that imports it when imported (safetensors.torch)."""
    return target == "torch" or target.startswith("torch.") or target.endswith(".torch")


def parent_packages(module: str) -> list[str]:
    """The project packages Python runs before `module` (their __init__.py), outermost first."""
    parts = module.split(".")
    return [p for p in (".".join(parts[:end]) for end in range(1, len(parts))) if p in project_modules()]


def torch_chains(module: str) -> list[str]:
    """Every way importing `module` reaches torch: its own torch imports (wherever they are), and those of what
    importing it runs (imports outside functions, followed through project modules and their packages)."""
    chains = [
        f"{module} -> {found.target} ({where(module, found.line)})"
        for found in imports_of(module)
        if is_torch(found.target)
    ]
    seen = {module}
    queue = [(module, module)]  # (project module, the chain that runs it)
    while queue:
        current, chain = queue.pop(0)
        runs = [(package, f"{chain} -> {package} (package)") for package in parent_packages(current)]
        for found in imports_of(current):
            if not found.at_import_time:
                continue
            if current != module and is_torch(found.target):
                chains.append(f"{chain} -> {found.target} ({where(current, found.line)})")
            target = project_module_of(found.target)
            if target is not None:
                runs += [(package, f"{chain} -> {package} (package)") for package in parent_packages(target)]
                runs.append((target, f"{chain} -> {target} ({where(current, found.line)})"))
        for target, target_chain in runs:
            if target not in seen:
                seen.add(target)
                queue.append((target, target_chain))
    return chains


def test_scheduler_imports_no_torch() -> None:
    if SCHEDULER not in project_modules():
        pytest.skip("server/scheduler.py does not exist yet; this rule applies once it does")
    chains = torch_chains(SCHEDULER)
    assert not chains, "server/scheduler.py reaches torch:\n  " + "\n  ".join(chains)


def test_the_torch_finder_follows_project_imports() -> None:
    """torch_chains on the real tree: model.attention imports torch, and so does whatever imports it."""
    assert any(chain.endswith(")") and "-> torch" in chain for chain in torch_chains("model.attention"))
    assert any("model.attention" in chain for chain in torch_chains("model.blocks"))
