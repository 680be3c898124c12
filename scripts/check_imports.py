"""Import cycles among the package's modules, module sizes and the longest functions.

Every `import` and `from … import` statement counts, also those inside functions: a module that
imports another which imports it back (directly or around a longer loop) is a cycle. A package's
`__init__` counts as a module; `from . import x` imports the sub-module x.

    python scripts/check_imports.py [--max-lines 600] [--top 5]

Exits 1 when it finds a cycle or a module over --max-lines lines.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "distributed_ebm"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The package modules a `from … import …` statement names (the module, or its sub-modules)."""
    if node.level:
        base = module.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{alias.name}" for alias in node.names]


def imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module → the package modules it imports (anywhere in its body)."""
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                found.update(resolve(name, path.name == "__init__.py", node))
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def functions(modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(lines, module:qualified name) of every function and method."""
    found = []

    def walk(module: str, node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((child.end_lineno - child.lineno + 1, f"{module}:{prefix}{child.name}"))
                walk(module, child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                walk(module, child, f"{prefix}{child.name}.")

    for name, path in modules.items():
        walk(name, ast.parse(path.read_text()), "")
    return sorted(found, reverse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-lines", type=int, default=600)
    parser.add_argument("--top", type=int, default=5, help="longest functions to list")
    args = parser.parse_args(argv)
    modules = {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}
    found = cycles(imports(modules))
    for component in found:
        print("cycle:", " ↔ ".join(component))
    if not found:
        print(f"no import cycles among {len(modules)} modules")
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules.items()}
    large = {name: n for name, n in sizes.items() if n > args.max_lines}
    for name, n in sorted(large.items(), key=lambda kv: -kv[1]):
        print(f"over {args.max_lines} lines: {name} ({n})")
    for lines, name in functions(modules)[: args.top]:
        print(f"{lines:4d} lines  {name}")
    return 1 if found or large else 0


if __name__ == "__main__":
    sys.exit(main())
