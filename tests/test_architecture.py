"""Package-wide rules, checked by walking the syntax tree of every module of ``transformer_jax``.

* no function (or method) longer than 80 lines;
* no private name (``_x``) imported from, or read off, another module of the package;
* no jax / flax internals (``jax._src``, ``flax.nnx._x``, any ``_``-prefixed part of a path
  into jax, jaxlib, flax, optax or orbax);
* no dispatch on another part's classes (``isinstance`` / ``issubclass`` / ``type(x) is``
  with a class imported from another module of the package) and, outside ``nn/``, no
  comparison with a model-kind string ("encoder_decoder", "decoder_only");
* no import cycles between the package's modules (function-local imports included);
* one home per public name: a non-package module lists in ``__all__`` only names it defines,
  and no two non-package modules list the same name (packages re-export).

The checks read the source only (nothing is imported), so they are fast and see every file.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "transformer_jax"
MAX_FUNCTION_LINES = 80
MODEL_KINDS = ("encoder_decoder", "decoder_only")
INTERNAL_ROOTS = ("jax", "jaxlib", "flax", "optax", "orbax")

# Violations in modules that other work is changing at the same time (the attention
# functions of ops/, the search of decoding.py, the data pipeline); each entry names the rule,
# the file and the start of the violation's description. The list only shrinks: an entry
# whose violation is gone fails the test until it is removed.
KNOWN = {
    ("long function", "transformer_jax/decoding.py", "beam_search "),
    ("re-export", "transformer_jax/data/pipeline.py", "BATCH_KEYS "),
}


# --------------------------------------------------------------------------- reading
class Module:
    """One parsed module: its dotted name, path, tree and what its imports bind."""

    def __init__(self, name: str, path: str):
        self.name, self.path = name, path
        self.is_package = path.endswith("__init__.py")
        with open(path, encoding="utf-8") as f:
            self.tree = ast.parse(f.read(), path)
        self.package = name if self.is_package else name.rpartition(".")[0]
        # local name -> (module, attribute or None): what each import binds in this module
        self.bindings: dict[str, tuple[str, str | None]] = {}
        for node in ast.walk(self.tree):
            for target, source in self.imports_of(node):
                self.bindings[target] = source

    @property
    def relpath(self) -> str:
        return os.path.relpath(self.path, ROOT)

    def absolute(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = self.package.split(".")
        base = base[: len(base) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))

    def imports_of(self, node) -> Iterator[tuple[str, tuple[str, str | None]]]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    yield alias.asname, (alias.name, None)
                else:
                    root = alias.name.split(".")[0]
                    yield root, (root, None)
        elif isinstance(node, ast.ImportFrom):
            source = self.absolute(node)
            for alias in node.names:
                yield alias.asname or alias.name, (source, alias.name)


def package_modules() -> dict[str, Module]:
    modules = {}
    for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for file in sorted(files):
            if not file.endswith(".py"):
                continue
            path = os.path.join(folder, file)
            parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = Module(".".join(parts), path)
    return modules


MODULES = package_modules()


def resolve(module: Module, source: tuple[str, str | None]) -> str:
    """The module an import binding refers to: ``pkg.name`` when that is a module."""
    target, attribute = source
    if attribute is not None and f"{target}.{attribute}" in MODULES:
        return f"{target}.{attribute}"
    return target


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def dotted(node) -> list[str] | None:
    """``a.b.c`` as ``["a", "b", "c"]`` (None for anything but names and attributes)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def in_package(module_name: str) -> bool:
    return module_name == PACKAGE or module_name.startswith(PACKAGE + ".")


# --------------------------------------------------------------------------- the rules
def long_functions(module: Module) -> Iterator[tuple[str, str]]:
    for node in ast.walk(module.tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                yield "long function", f"{node.name} ({lines} lines, line {node.lineno})"


def private_names(module: Module) -> Iterator[tuple[str, str]]:
    for node in ast.walk(module.tree):
        if isinstance(node, ast.ImportFrom):
            source = module.absolute(node)
            if not in_package(source):
                continue
            if any(is_private(p) for p in source.split(".")):
                yield "private name", f"imports private module {source}"
            for alias in node.names:
                if is_private(alias.name):
                    yield "private name", f"imports {alias.name} from {source}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if in_package(alias.name) and any(is_private(p) for p in alias.name.split(".")):
                    yield "private name", f"imports private module {alias.name}"
        elif isinstance(node, ast.Attribute) and is_private(node.attr):
            path = dotted(node.value)
            if path and path[0] in module.bindings:
                bound = resolve(module, module.bindings[path[0]])
                if in_package(bound) and bound != module.name:
                    yield "private name", f"reads {'.'.join(path)}.{node.attr} of {bound}"


def internals(module: Module) -> Iterator[tuple[str, str]]:
    def private_path(name: str) -> bool:
        parts = name.split(".")
        return parts[0] in INTERNAL_ROOTS and any(is_private(p) for p in parts[1:])

    found = set()
    for node in ast.walk(module.tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Attribute):
            path = dotted(node)
            if path and path[0] in module.bindings:
                source, attribute = module.bindings[path[0]]
                full = source if attribute is None else f"{source}.{attribute}"
                names = [".".join([full, *path[1:]])]
        found.update(name for name in names if private_path(name))
    for name in sorted(found):  # a.b._c.d, not also its prefix a.b._c
        if not any(other.startswith(name + ".") for other in found):
            yield "jax/flax internals", name


def _class_refs(node) -> Iterator[ast.AST]:
    """The class expressions of an isinstance second argument (tuples and ``A | B``)."""
    if isinstance(node, ast.Tuple):
        for element in node.elts:
            yield from _class_refs(element)
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        yield from _class_refs(node.left)
        yield from _class_refs(node.right)
    else:
        yield node


def _package_class(module: Module, node) -> str | None:
    """``module.Class`` when ``node`` names a class imported from another module of the
    package (None otherwise)."""
    path = dotted(node)
    if not path or path[0] not in module.bindings:
        return None
    source, attribute = module.bindings[path[0]]
    target = resolve(module, (source, attribute))
    if not in_package(target) or target == module.name:
        return None
    if target in MODULES and attribute is not None and f"{source}.{attribute}" == target:
        return ".".join([target, *path[1:]]) if len(path) > 1 else None
    if attribute is None:
        return ".".join([source, *path[1:]]) if len(path) > 1 else None
    return ".".join([source, attribute, *path[1:]])


def _kind_constant(node) -> bool:
    if isinstance(node, ast.Constant) and node.value in MODEL_KINDS:
        return True
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return any(_kind_constant(e) for e in node.elts)
    return False


def dispatch(module: Module) -> Iterator[tuple[str, str]]:
    outside_nn = not module.name.startswith(f"{PACKAGE}.nn")
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and (
                node.func.id in ("isinstance", "issubclass") and len(node.args) == 2):
            for ref in _class_refs(node.args[1]):
                name = _package_class(module, ref)
                if name:
                    yield "dispatch", f"{node.func.id}(..., {name}) line {node.lineno}"
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Call) and isinstance(s.func, ast.Name)
                   and s.func.id == "type" for s in sides):
                for side in sides:
                    name = _package_class(module, side)
                    if name:
                        yield "dispatch", f"type(...) against {name} line {node.lineno}"
            if outside_nn and any(_kind_constant(s) for s in sides):
                yield "dispatch", f"compares with a model-kind string, line {node.lineno}"
        elif isinstance(node, ast.match_case) and outside_nn and _kind_constant(
                getattr(node.pattern, "value", None)):
            yield "dispatch", f"matches a model-kind string, line {node.pattern.lineno}"


def _exported(module: Module) -> list[str]:
    for node in module.tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
    return []


def foreign_exports(module: Module) -> Iterator[tuple[str, str]]:
    if module.is_package:
        return
    imported = set(module.bindings)
    for name in _exported(module):
        if name in imported:
            yield "re-export", f"{name} (defined in {module.bindings[name][0]})"


RULES = {
    "long function": long_functions,
    "private name": private_names,
    "jax/flax internals": internals,
    "dispatch": dispatch,
    "re-export": foreign_exports,
}


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for module in MODULES.values():
        for node in ast.walk(module.tree):
            for _, source in module.imports_of(node):
                target = resolve(module, source)
                if target in MODULES and target != module.name:
                    graph[module.name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


# --------------------------------------------------------------------------- the tests
def violations(rule: str) -> set[tuple[str, str]]:
    return {(module.relpath, detail) for module in MODULES.values()
            for found, detail in RULES[rule](module) if found == rule}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_package_rule(rule):
    found = violations(rule)
    known = {(path, start) for r, path, start in KNOWN if r == rule}

    def listed(path, detail):
        return any(path == p and detail.startswith(start) for p, start in known)

    new = sorted(v for v in found if not listed(*v))
    stale = sorted((p, start) for p, start in known
                   if not any(p == path and d.startswith(start) for path, d in found))
    assert not new, f"{rule}: " + "; ".join(f"{p}: {d}" for p, d in new)
    assert not stale, (f"{rule}: fixed, remove from KNOWN in {__file__}: "
                       + "; ".join(f"{p}: {d}" for p, d in stale))


ENTRY_POINTS = {"main"}  # each command-line module has its own


def test_one_home_per_public_name():
    """No public name is listed in the ``__all__`` of two non-package modules."""
    homes: dict[str, list[str]] = {}
    for module in MODULES.values():
        for name in _exported(module) if not module.is_package else ():
            homes.setdefault(name, []).append(module.relpath)
    shared = {name: paths for name, paths in homes.items()
              if len(paths) > 1 and name not in ENTRY_POINTS}
    known = {start.strip(): path for rule, path, start in KNOWN if rule == "re-export"}
    shared = {n: p for n, p in shared.items() if not (n in known and known[n] in p)}
    assert shared == {}


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checks_find_what_they_look_for(tmp_path):
    """Each rule on a small module written to break it (the checks can fail)."""
    source = "\n".join([
        "import jax",
        "from jax._src import distributed",
        "from transformer_jax.nn.build import _config, ModelDef",
        "from transformer_jax import nn",
        "__all__ = ['ModelDef', 'f']",
        "def f(model, kind):",
        "    if isinstance(model, ModelDef) or isinstance(model, nn.Transformer):",
        "        return jax._src.core",
        "    if kind == 'decoder_only':",
        "        return nn._private",
        *["    pass"] * 80,
    ])
    path = tmp_path / "bad.py"
    path.write_text(source)
    module = Module(f"{PACKAGE}.training.bad", str(path))
    found = {rule: [d for _, d in RULES[rule](module)] for rule in RULES}
    assert found["long function"] == ["f (85 lines, line 6)"]
    assert sorted(found["private name"]) == [
        "imports _config from transformer_jax.nn.build",
        "reads nn._private of transformer_jax.nn"]
    assert sorted(found["jax/flax internals"]) == ["jax._src.core", "jax._src.distributed"]
    assert sorted(found["dispatch"]) == [
        "compares with a model-kind string, line 9",
        "isinstance(..., transformer_jax.nn.Transformer) line 7",
        "isinstance(..., transformer_jax.nn.build.ModelDef) line 7"]
    assert found["re-export"] == ["ModelDef (defined in transformer_jax.nn.build)"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
