"""The package's layout as rules read from the source: no import cycles, the CLI at the edge, the library
apart from the tools, imports at the top (or a comment saying why not), files of a readable size."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "realjax"
MAX_LINES = 420


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, tree: ast.Module | None = None) -> list[tuple[ast.stmt, list[str]]]:
    """Every import statement of a module (top level or not) with the modules it loads: ``from P import x``
    loads ``P.x`` when that is a realjax module, else ``P`` (for a package, its ``__init__``)."""
    out = []
    for node in ast.walk(tree or ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.append((node, [a.name for a in node.names]))
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node, [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                               for a in node.names]))
    return out


def _graph() -> dict[str, set[str]]:
    return {name: {t for _, targets in _imports(path) for t in targets if t in MODULES and t != name}
            for name, path in MODULES.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _library():
    """Everything but the command line (``realjax.cli``, ``python -m realjax``) and the tools behind it."""
    return {n: p for n, p in MODULES.items() if not n.startswith(("realjax.cli", "realjax.tools", "realjax.__main__"))}


def test_only_the_cli_parses_arguments_and_the_library_never_imports_it():
    offenders = [f"{name} imports {t}" for name, path in _library().items() for _, targets in _imports(path)
                 for t in targets if t.startswith("realjax.cli") or t == "argparse"]
    offenders += [f"{name} imports realjax.cli" for name, path in MODULES.items() if name.startswith("realjax.tools")
                  for _, targets in _imports(path) for t in targets if t.startswith("realjax.cli") or t == "argparse"]
    assert not offenders, offenders


def test_the_library_does_not_import_the_tools():
    offenders = [f"{name} imports {t}" for name, path in _library().items() for _, targets in _imports(path)
                 for t in targets if t.startswith("realjax.tools")]
    assert not offenders, offenders


def test_imports_inside_functions_say_why():
    """An import below the top level is either a heavy or optional package (torch, matplotlib, libtpu, ...)
    or one that must wait (JAX after the preemption handler is installed); either way a comment on the
    import block's first line, or the line above it, says so."""
    missing = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        top = {id(n) for n in tree.body}
        for n in tree.body:  # `try: import x` / `if TYPE_CHECKING:` at module level count as the top
            if isinstance(n, (ast.Try, ast.If)):
                top.update(id(m) for m in ast.walk(n))
        for node, _ in _imports(path, tree):
            if id(node) in top:
                continue
            first = node.lineno - 1
            while first > 0 and lines[first - 1].strip().startswith(("import ", "from ")):
                first -= 1  # the first import of a contiguous block
            if "#" not in lines[first] and not lines[first - 1].strip().startswith("#") and "#" not in \
                    lines[node.lineno - 1]:
                missing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not missing, f"imports inside functions without a comment saying why: {missing}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_files_stay_readable(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[name]} has {n} lines; split it by concern"
