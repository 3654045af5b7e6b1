"""The import graph of the ``cmpe_se_fused`` package, read from its source with ``ast`` (nothing is imported).

    python tests/import_graph.py             # every module and the package modules it imports
    python tests/import_graph.py --cycles    # only the cycles; exit status 1 when there is one

What counts as an edge ``A -> B`` (``A`` and ``B`` modules of the package):

- every import statement in ``A``'s source, wherever it stands: module level, inside a function or a
  class, under ``if``/``try``/``TYPE_CHECKING``. A function-level import only postpones the cycle to
  the first call; the two modules still need each other, so it counts;
- ``importlib.import_module("a.literal.name")`` (a computed name, such as the compiled extensions'
  ``f"cmpe_se_fused.{name}"``, cannot be resolved from the source and is not counted);
- ``from P import n`` names ``P`` and, when ``P.n`` is a module of the package, ``P.n`` too;
- importing ``P.Q.m`` also runs ``P.Q``'s ``__init__``: the packages above ``B`` count as well, except
  those above ``A`` (they are already being initialised when ``A`` runs, so they form no cycle).

Modules outside the package (torch, triton, the compiled ``_C`` extensions, ...) are left out.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = "cmpe_se_fused"
DEFAULT_ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def package_modules(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file below ``root`` (a package ``__init__``
    is named by its package)."""
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = (package,) + path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _resolve_relative(name: str, is_package: bool, level: int, target: str | None) -> str:
    base = name.split(".") if is_package else name.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _named(module: str, path: Path, tree: ast.AST):
    """The dotted names the import statements of ``module`` name, with ``from X import n``'s ``X.n``."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            src = _resolve_relative(module, is_package, node.level, node.module) if node.level else node.module
            yield src
            yield from (f"{src}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            yield node.args[0].value


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or \
        (isinstance(func, ast.Name) and func.id == "import_module")


def import_graph(root: Path = DEFAULT_ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the set of package modules it imports (see the module docstring for what counts)."""
    mods = package_modules(root, package)
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        own_parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        if path.name == "__init__.py":
            own_parents.add(name)
        deps = set()
        for target in _named(name, path, tree):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                dep = ".".join(parts[:i])
                if dep in mods and dep not in own_parents and dep != name:
                    deps.add(dep)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted; a module
    never imports itself here (``import_graph`` drops self-edges)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def cycle_path(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """One shortest cycle through ``comp[0]`` inside the component ``comp``: ``[a, b, ..., a]``."""
    start, members = comp[0], set(comp)
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return path[::-1] + [start]  # path runs v -> ... -> start
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise ValueError(f"{comp} is not a cycle of the graph")


def format_graph(graph: dict[str, set[str]]) -> str:
    width = max(map(len, graph))
    return "\n".join(f"{name:<{width}} -> {', '.join(sorted(deps)) or '-'}" for name, deps in sorted(graph.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", action="store_true", help="print only the cycles; exit 1 when there is one")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"the package directory (default: {PACKAGE}/)")
    args = parser.parse_args(argv)
    graph = import_graph(args.root, args.root.name)
    found = cycles(graph)
    if not args.cycles:
        print(format_graph(graph))
    for comp in found:
        print("cycle:", " -> ".join(cycle_path(graph, comp)))
    if args.cycles and not found:
        print("no cycle")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
