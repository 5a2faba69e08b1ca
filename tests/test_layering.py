"""The package layering holds: every import points down the DAG, and no modules import each other in a circle.

Reads every module's imports with ``ast`` (function-level imports included: a lazy import is still a
dependency), so the test needs no import side effects and names the offending file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import megacontext

PKG = Path(megacontext.__file__).parent

# Layer of each top-level unit of the package: a unit may import only units of a strictly lower layer (and
# itself). Units sharing a layer are siblings and must not import each other. Keep in sync with the DAG in
# megacontext/__init__.py's docstring (checked below).
LAYERS: dict[str, int] = {
    "core": 0,
    "data": 1,
    "base": 2,
    "tree": 3,
    "gistnet": 4, "wc": 4,
    "lensnet": 5,
    "focus": 6,
    "runtime": 7,
    "api": 8,
    "": 9,  # the package facade megacontext/__init__.py (version; lazy re-export of the API and configs)
    "demo": 10, "bench": 10, "serve": 10,
    "cli": 11,
    "__main__": 12,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported megacontext module, line) for every import statement in the file; ``from a import b`` names
    ``a.b`` when that is a module of the package, else ``a``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "megacontext"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "megacontext":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((sub if sub in MODULES else node.module, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; use absolute megacontext.* imports")
    return out


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in MODULES}
    assert units <= set(LAYERS), f"modules outside the DAG: {sorted(units - set(LAYERS))}; add them to LAYERS"


def test_imports_point_down_the_dag():
    bad = []
    for module, path in MODULES.items():
        src = _unit(module)
        for target, line in _imports(path):
            dst = _unit(target)
            if dst != src and LAYERS[dst] >= LAYERS[src]:
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: {src or 'megacontext'} (layer {LAYERS[src]}) "
                           f"imports {target} (layer {LAYERS[dst]})")
    assert not bad, "imports that go up or sideways in the DAG:\n" + "\n".join(bad)


def test_working_context_is_used_through_its_package():
    """Outside wc/, code imports ``megacontext.wc`` (its exported API), never the modules behind it."""
    bad = [f"{path.relative_to(PKG.parent)}:{line}: imports {target}"
           for module, path in MODULES.items() if _unit(module) != "wc"
           for target, line in _imports(path) if target.startswith("megacontext.wc.")]
    assert not bad, "imports of wc internals:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles_between_modules_or_packages():
    modules = {m: {t for t, _ in _imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    units: dict[str, set[str]] = {u: set() for u in LAYERS}
    for m, targets in modules.items():
        units[_unit(m)] |= {_unit(t) for t in targets} - {_unit(m)}
    assert not _cycles(units), f"import cycles between packages: {_cycles(units)}"
    assert not _cycles(modules), f"import cycles between modules: {_cycles(modules)}"


def test_cycle_finder_finds_a_circle():  # the check above must be able to fail
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_layout_limits():
    """At most 8 modules directly in megacontext/, none over 400 lines, no repeated commands.py."""
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= 8, f"{len(top)} modules directly in megacontext/: {top}"
    sizes = {str(p.relative_to(PKG.parent)): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    long = {k: n for k, n in sizes.items() if n > 400}
    assert not long, f"modules over 400 lines: {long}"
    assert not list(PKG.rglob("commands.py")), "CLI modules live in megacontext/cli/"


def test_facade_exports_resolve():
    assert sorted(megacontext.__all__) == sorted(["__version__", *megacontext._EXPORTS])
    for name in megacontext._EXPORTS:
        assert getattr(megacontext, name).__name__ == name


def test_package_docstring_states_the_dag():
    doc = megacontext.__doc__ or ""
    for unit in LAYERS:
        if unit and unit != "__main__":
            assert unit in doc, f"megacontext/__init__.py's docstring does not place {unit!r} in the DAG"
