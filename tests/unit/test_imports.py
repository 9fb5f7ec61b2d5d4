"""The package's import graph: no cycles, no import hidden in a function to dodge one, floors that stay floors,
and kafka-python behind its one seam.

The graph is read from the source with :mod:`ast`, not by importing: every
``import exactlyonce...`` and ``from exactlyonce... import ...`` (relative
ones too), at module level, in a function, or under ``if TYPE_CHECKING:``
(a type-only import is still a dependency of the design, even though it
runs only under mypy).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

import exactlyonce

ROOT = "exactlyonce"
PACKAGE_DIR = Path(exactlyonce.__file__).parent

#: Type-only imports that go against the layering, each with why it must stay for now.
TYPE_ONLY_ALLOWED: Mapping[tuple[str, str], str] = {}

#: Imports of an exactlyonce module inside a function, each with the real reason it must be lazy.
#: Dodging an import cycle is not a reason: fix the layering instead.
LAZY_ALLOWED: Mapping[tuple[str, str], str] = {
    ("exactlyonce.cli", "exactlyonce.console"): (
        "the console needs an optional extra (starlette, jinja2, uvicorn): imported when `exactlyonce console` runs"
    ),
    ("exactlyonce._kafka.selection", "exactlyonce._kafka.confluent"): (
        "the confluent consumer needs an optional extra (confluent-kafka): imported when App(kafka_client="
        "'confluent') runs"
    ),
}

#: The ground floor: each may import only the modules listed (all below it).
GROUND_FLOOR: Mapping[str, frozenset[str]] = {
    "exactlyonce.errors": frozenset(),
    "exactlyonce.settings": frozenset({"exactlyonce.errors"}),
}

#: The top floor: the entry points. Only the package's __init__ and the top floor itself import them.
#: The web console (a package) is an entry point on the admin layer, like the CLI. ``testing`` (the test
#: kit wraps an App) and ``pytest_plugin`` are the entry points of a service's tests.
TOP_FLOOR = frozenset({"exactlyonce.app", "exactlyonce.cli", "exactlyonce.admin", "exactlyonce.__main__",
                       "exactlyonce.console", "exactlyonce.testing", "exactlyonce.pytest_plugin"})


def on_top_floor(module: str) -> bool:
    """Whether ``module`` is on the top floor (a module of the console package included)."""
    return module in TOP_FLOOR or module.startswith("exactlyonce.console.")


#: The only part of the package (a module, or a package and its modules) that imports kafka-python.
KAFKA_SEAM = "exactlyonce._kafka"

#: The one module that imports confluent-kafka (an optional extra), imported only when that client is selected.
CONFLUENT_MODULE = "exactlyonce._kafka.confluent"

#: Modules outside the seam that import kafka-python all the same, each with why.
KAFKA_ALLOWED: Mapping[str, str] = {
    "exactlyonce.testing": (
        "the twins replace kafka-python's clients inside the seam's wrappers and raise kafka-python's errors, "
        "so that the wrappers' own translations stay under test"
    ),
}


@dataclass(frozen=True, slots=True)
class Edge:
    importer: str
    imported: str
    line: int
    #: Inside a function (or lambda) body: runs when called, not at import.
    lazy: bool
    #: Under ``if TYPE_CHECKING:``: runs only under a type checker.
    type_only: bool

    def __str__(self) -> str:
        where = " (in a function)" if self.lazy else " (type only)" if self.type_only else ""
        return f"{self.importer} -> {self.imported}{where}, line {self.line}"


def package_modules(package_dir: Path, root: str = ROOT) -> dict[str, Path]:
    """Every module of the package by dotted name (a package's ``__init__`` under the package's name)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [root, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, *, lazy: bool, type_only: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    """Every import statement under ``node``, with whether it runs lazily and whether only for type checking."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, lazy, type_only
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _walk(child, lazy=True, type_only=type_only)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for statement in child.body:
                yield from _walk(ast.Module(body=[statement], type_ignores=[]), lazy=lazy, type_only=True)
            for statement in child.orelse:
                yield from _walk(ast.Module(body=[statement], type_ignores=[]), lazy=lazy, type_only=type_only)
        else:
            yield from _walk(child, lazy=lazy, type_only=type_only)


def _targets(statement: ast.Import | ast.ImportFrom, importer: str, is_package: bool,
             modules: Mapping[str, object], root: str) -> Iterator[str]:
    """The package modules one import statement loads, nearest first (a subpackage's __init__ included)."""
    if isinstance(statement, ast.Import):
        named = [alias.name for alias in statement.names]
    else:
        base = statement.module or ""
        if statement.level:
            package = importer if is_package else importer.rpartition(".")[0]
            for _ in range(statement.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        # ``from package import name``: ``name`` is a submodule when the package has one by that name.
        named = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in statement.names]
    for name in named:
        if name != root and not name.startswith(root + "."):
            continue
        while name not in modules and "." in name:  # ``import exactlyonce.x.y`` where y is an attribute
            name = name.rpartition(".")[0]
        yield name
        # Importing a.b.c first runs a.b's __init__; the root's is left out: every import runs it, and
        # it is the façade above everything.
        # An importer's own enclosing packages are left out too: they were initialized (or are being, when
        # their __init__ imports this module) before the importer runs.
        parent = name.rpartition(".")[0]
        while parent and parent != root:
            if not importer.startswith(parent + "."):
                yield parent
            parent = parent.rpartition(".")[0]


def import_edges(modules: Mapping[str, Path], root: str = ROOT) -> list[Edge]:
    """Every import of a package module by a package module."""
    edges = []
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for statement, lazy, type_only in _walk(tree, lazy=False, type_only=False):
            for imported in dict.fromkeys(_targets(statement, importer, is_package, modules, root)):
                if imported != importer:
                    edges.append(Edge(importer, imported, statement.lineno, lazy, type_only))
    return edges


def external_imports(modules: Mapping[str, Path], top: str) -> list[Edge]:
    """Every import of the outside package ``top`` (or one of its modules) by a package module."""
    edges = []
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for statement, lazy, type_only in _walk(tree, lazy=False, type_only=False):
            if isinstance(statement, ast.Import):
                named = [alias.name for alias in statement.names]
            else:
                named = [] if statement.level else [statement.module or ""]
            for name in dict.fromkeys(named):
                if name == top or name.startswith(top + "."):
                    edges.append(Edge(importer, name, statement.lineno, lazy, type_only))
    return edges


def in_seam(module: str, seam: str) -> bool:
    """Whether ``module`` is the seam or, when the seam is a package, one of its modules."""
    return module == seam or module.startswith(seam + ".")


def find_cycle(edges: list[Edge]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or ``None``."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, set()).add(edge.imported)
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        # Iterative depth-first search; ``path`` is the chain of imports being followed.
        path = [start]
        branches = [iter(sorted(graph[start]))]
        while branches:
            following = next(branches[-1], None)
            if following is None:
                branches.pop()
                done.add(path.pop())
            elif following in path:
                return [*path[path.index(following):], following]
            elif following not in done:
                path.append(following)
                branches.append(iter(sorted(graph.get(following, ()))))
    return None


# -- the checks, on the package -------------------------------------------------------------------------------


MODULES = package_modules(PACKAGE_DIR)
EDGES = import_edges(MODULES)


def _counted(edges: list[Edge]) -> list[Edge]:
    """The edges the rules judge: all but the allowed type-only ones."""
    return [e for e in edges if not (e.type_only and (e.importer, e.imported) in TYPE_ONLY_ALLOWED)]


def test_the_walk_sees_the_package() -> None:
    """Not vacuous: the walk finds the package's modules and the imports every module makes of errors."""
    assert {"exactlyonce", "exactlyonce.app", "exactlyonce.errors", "exactlyonce.settings",
            "exactlyonce.handler"} <= set(MODULES)
    assert len(MODULES) >= 20
    importers_of_errors = {e.importer for e in EDGES if e.imported == "exactlyonce.errors"}
    assert {"exactlyonce", "exactlyonce.settings", "exactlyonce.handler", "exactlyonce.app"} <= importers_of_errors


def test_no_import_cycle() -> None:
    """No chain of imports among exactlyonce's modules leads back to where it started."""
    cycle = find_cycle(_counted(EDGES))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_exactlyonce_import_inside_a_function() -> None:
    """Modules import each other at the top; a function-level import is how a cycle hides.

    Third-party imports inside functions (optional or heavy dependencies) are fine and not checked.
    """
    lazy = [str(e) for e in EDGES if e.lazy and (e.importer, e.imported) not in LAZY_ALLOWED]
    assert not lazy, "imports of exactlyonce modules inside functions:\n" + "\n".join(lazy)


def test_allow_lists_hold_only_imports_that_exist() -> None:
    """An entry whose import is gone is removed, so the lists stay short and true."""
    lazy = {(e.importer, e.imported) for e in EDGES if e.lazy}
    type_only = {(e.importer, e.imported) for e in EDGES if e.type_only}
    assert set(LAZY_ALLOWED) <= lazy
    assert set(TYPE_ONLY_ALLOWED) <= type_only
    assert set(KAFKA_ALLOWED) <= {e.importer for e in external_imports(MODULES, "kafka")}


def test_ground_floor_imports_nothing_above_it() -> None:
    """errors imports no exactlyonce module; settings only errors."""
    for module, allowed in GROUND_FLOOR.items():
        above = sorted(str(e) for e in EDGES if e.importer == module and e.imported not in allowed)
        assert not above, f"{module} imports above the ground floor: {above}"


def test_only_the_entry_points_import_the_top_floor() -> None:
    """app, cli, admin are imported by the package's __init__ and each other, never from below."""
    upward = sorted(str(e) for e in _counted(EDGES)
                    if on_top_floor(e.imported) and not (on_top_floor(e.importer) or e.importer == ROOT))
    assert not upward, "imports of the top floor from below:\n" + "\n".join(upward)


def test_only_the_kafka_seam_imports_kafka_python() -> None:
    """kafka-python (``kafka`` and its modules) is imported in exactlyonce._kafka and nowhere else in the package.

    Everything else speaks exactlyonce's types (Message, the seam's TopicPartition, its errors); an import
    in a function or under ``if TYPE_CHECKING:`` counts too. The test twins are the one allowed exception.
    """
    edges = external_imports(MODULES, "kafka")
    assert any(in_seam(e.importer, KAFKA_SEAM) for e in edges), "the walk found no kafka import in the seam"
    outside = sorted(str(e) for e in edges if not in_seam(e.importer, KAFKA_SEAM) and e.importer not in KAFKA_ALLOWED)
    assert not outside, f"kafka-python imported outside {KAFKA_SEAM}:\n" + "\n".join(outside)


def test_only_the_kafka_seam_imports_confluent_kafka() -> None:
    """confluent-kafka (the optional consumer, ``App(kafka_client="confluent")``) only in its module of the seam.

    No exception, not even the test twins: the rest of the package, the seam's ``__init__`` included, must
    import without the extra installed.
    """
    edges = external_imports(MODULES, "confluent_kafka")
    assert {e.importer for e in edges} == {CONFLUENT_MODULE}, "\n".join(sorted(map(str, edges)))


# -- the checker itself, on small made-up packages --------------------------------------------------------------


def _package(tmp_path: Path, files: Mapping[str, str]) -> list[Edge]:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return import_edges(package_modules(tmp_path / "pkg", "pkg"), "pkg")


def test_checker_reports_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    """a -> b at the top, b -> a inside a function: a cycle, reported with its path, and a lazy import."""
    edges = _package(tmp_path, {
        "__init__.py": "from pkg.a import A\n",
        "a.py": "import json\nfrom pkg import b\nA = 1\n",
        "b.py": "def f():\n    import yaml\n    from pkg.a import A\n    return A\n",
    })
    assert find_cycle(edges) == ["pkg.a", "pkg.b", "pkg.a"]
    assert [(e.importer, e.imported, e.lazy) for e in edges if e.lazy] == [("pkg.b", "pkg.a", True)]


def test_checker_resolves_relative_type_only_and_subpackage_imports(tmp_path: Path) -> None:
    """Relative imports, ``if TYPE_CHECKING:`` blocks and a subpackage's __init__ all become edges."""
    edges = _package(tmp_path, {
        "__init__.py": "",
        "base.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .top import T\n",
        "top.py": "from .sub.leaf import f\nimport pkg.base\n",
        "sub/__init__.py": "from . import leaf\n",
        "sub/leaf.py": "from ..base import *\nf = 1\n",
    })
    found = {(e.importer, e.imported, e.type_only) for e in edges}
    assert found == {
        ("pkg.base", "pkg.top", True),
        ("pkg.top", "pkg.sub.leaf", False), ("pkg.top", "pkg.sub", False), ("pkg.top", "pkg.base", False),
        ("pkg.sub", "pkg.sub.leaf", False),
        ("pkg.sub.leaf", "pkg.base", False),
    }
    assert find_cycle(edges) == ["pkg.base", "pkg.top", "pkg.base"]


def test_checker_finds_every_kind_of_kafka_import(tmp_path: Path) -> None:
    """Plain, from-, lazy and type-only imports of kafka and its modules count; look-alike names do not."""
    _package(tmp_path, {
        "__init__.py": "",
        "_kafka/__init__.py": "import kafka\n",
        "_kafka/reader.py": "from kafka.admin import ConfigResource\n",
        "admin.py": ("import kafka.errors\nimport kafkaesque\nfrom typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from kafka.structs import TopicPartition\n"
                     "def f():\n    from kafka import KafkaConsumer\n"),
        "near.py": "from ._kafka import reader\nfrom pkg._kafka import x\nimport kafka_tools\n",
    })
    edges = external_imports(package_modules(tmp_path / "pkg", "pkg"), "kafka")
    found = {(e.importer, e.imported, e.lazy, e.type_only) for e in edges}
    assert found == {
        ("pkg._kafka", "kafka", False, False),
        ("pkg._kafka.reader", "kafka.admin", False, False),
        ("pkg.admin", "kafka.errors", False, False),
        ("pkg.admin", "kafka.structs", False, True),
        ("pkg.admin", "kafka", True, False),
    }
    outside = {e.importer for e in edges if not in_seam(e.importer, "pkg._kafka")}
    assert outside == {"pkg.admin"}
    assert not in_seam("pkg._kafkaesque", "pkg._kafka")


def test_checker_finds_no_cycle_in_a_tree(tmp_path: Path) -> None:
    """A diamond (two modules importing a third) is not a cycle."""
    edges = _package(tmp_path, {
        "__init__.py": "from pkg import left, right\n",
        "left.py": "from pkg.low import x\n",
        "right.py": "from pkg import low\n",
        "low.py": "x = 1\n",
    })
    assert len(edges) == 4
    assert find_cycle(edges) is None


@pytest.mark.parametrize("module", sorted(GROUND_FLOOR))
def test_ground_floor_modules_exist(module: str) -> None:
    """The layering rule names real modules (a rename must update it)."""
    assert module in MODULES
