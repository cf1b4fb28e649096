"""
The layers of ``sesame/`` as a test: imports point down only.

The import graph is built from the source (``ast``), module-level and function-level
imports alike, so an import hidden inside a function to dodge a cycle still counts.  The
checks:

* no cycle between modules;
* no import from a higher layer (the table :data:`LAYERS`, bottom first);
* the sans-IO modules import none of twisted, grpc, asyncio, threading, socket, time or
  sqlite3, and only sans-IO modules of ours;
* no module reaches into another package's private names: a ``_private`` module is
  imported only from inside its package, a ``_name`` only from a private module of the
  importer's own package (or the package itself), and ``imported._attr`` (e.g.
  ``endpoints._parse`` of Twisted) not at all;
* importing the light public modules does not load sqlite3, prometheus_client or grpc
  where they are not needed (checked in a fresh interpreter).

Run as a script (``python tests/test_layers.py [ROOT]``) it prints every violation of a
tree, which is how the commit that introduced it showed that the flat tree before it
failed.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Bottom first.  A module may import modules of its own layer or of lower layers (a
#: cycle inside a layer is caught by the cycle check); the first matching prefix wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("wire and leaves", ("sesame", "sesame._names", "sesame._wire", "sesame.type",
                         "sesame.v1alpha1", "sesame.grpctunnel", "sesame.admin")),
    ("sans-IO core", ("sesame.core",)),
    ("bridge", ("sesame.bridge",)),
    ("gRPC adapters", ("sesame.tunnel",)),
    ("NetConn", ("sesame.netconn",)),
    ("relay", ("sesame.relay",)),
    ("remote agent", ("sesame.remote",)),
    ("endpoints", ("sesame.endpoints",)),
    ("forward", ("sesame.forward",)),
    ("hub", ("sesame.hub", "sesame.hub.store", "sesame.hub._redisstore")),
    ("entry-point helpers", ("sesame._cliutil",)),
    ("entry points", ("sesame._routecli", "sesame._callcli", "sesame.tap", "sesame.cli", "sesame.__main__",
                      "sesame.testing", "sesame.testing.redis", "sesame._regen")),
    ("one-release aliases", ("sesame.mgmt", "sesame.frontdoor", "sesame.metrics",
                             "sesame.dashboard", "sesame._bridge")),
]

#: Modules that must stay sans-IO (plain calls in, results out).
SANS_IO = ("sesame.core", "sesame._names", "sesame._wire", "sesame.netconn._allowlist",
           "sesame.hub._sniff", "sesame.hub._target")
IO_MODULES = frozenset({"twisted", "grpc", "asyncio", "threading", "socket", "time", "sqlite3"})
#: Names that start with ``_`` and are public all the same.
PUBLIC_UNDERSCORES = frozenset({"os._exit", "sys._getframe"})
GENERATED = ("sesame.type", "sesame.v1alpha1", "sesame.grpctunnel", "sesame.admin")


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    #: (target module, imported name or None, line) for every import of a sesame module
    imports: list[tuple[str, str | None, int]] = field(default_factory=list)
    #: top-level names of every import, sesame or not
    externals: list[tuple[str, int]] = field(default_factory=list)
    #: (module the bound name came from, attribute, line) for ``bound._attr``
    reaches: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def package(self) -> str:
        return self.name if self.is_package else self.name.rpartition(".")[0]


def _modules(root: Path) -> dict[str, Module]:
    out = {}
    for path in sorted((root / "sesame").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        name = ".".join(parts)
        if name.startswith(GENERATED) or path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        out[name] = Module(name, path, is_package)
    return out


def _resolve(mod: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.package.split(".")
    if node.level > 1:
        base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def build_graph(root: Path = ROOT) -> dict[str, Module]:
    mods = _modules(root)
    known = set(mods)
    for mod in mods.values():
        tree = ast.parse(mod.path.read_text(), str(mod.path))
        bound: dict[str, str] = {}  # local name -> module it came from
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    mod.externals.append((alias.name.split(".")[0], node.lineno))
                    if alias.name.startswith("sesame"):
                        mod.imports.append((alias.name, None, node.lineno))
                    local = alias.asname or alias.name.split(".")[0]
                    bound[local] = alias.name if alias.asname else local
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, node)
                mod.externals.append((target.split(".")[0], node.lineno))
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    local = alias.asname or alias.name
                    if sub in known or (target.startswith("sesame") and sub.startswith(GENERATED)):
                        mod.imports.append((sub, None, node.lineno))  # a submodule
                        bound[local] = sub
                    elif target.startswith("sesame"):
                        mod.imports.append((target, alias.name, node.lineno))
                        bound[local] = target  # a name defined in module ``target``
                    else:
                        bound[local] = sub
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in bound and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                mod.reaches.append((bound[node.value.id], node.attr, node.lineno))
    return mods


def _layer(name: str) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    return rank


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _private_module_problem(importer: Module, target: str) -> str | None:
    parts = target.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            owner = ".".join(parts[:i])  # the package the private module belongs to
            if not _inside(importer.name, owner) or (owner == importer.name and not importer.is_package):
                return f"imports private module {'.'.join(parts[: i + 1])} of package {owner}"
    return None


def _private_name_ok(importer: Module, source: str) -> bool:
    """May ``importer`` use a ``_name`` defined in module ``source``?"""
    if source == importer.name:
        return True
    if source == importer.package:  # the package's own __init__ is its internal API
        return True
    return source.rpartition(".")[0] == importer.package and source.rpartition(".")[2].startswith("_")


def _cycles(mods: dict[str, Module]) -> list[list[str]]:
    graph = {n: sorted({t for t, _, _ in m.imports if t in mods and t != n}) for n, m in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def violations(root: Path = ROOT) -> dict[str, list[str]]:
    mods = build_graph(root)
    found: dict[str, list[str]] = {"cycle": [], "upward": [], "sans-io": [], "private": []}
    for comp in _cycles(mods):
        found["cycle"].append(" <-> ".join(comp))
    for mod in mods.values():
        where = f"{mod.path.relative_to(root)}"
        rank = _layer(mod.name)
        if rank < 0:
            found["upward"].append(f"{where}: {mod.name} is in no layer of LAYERS")
        for target, name, line in mod.imports:
            if target in mods and _layer(target) > rank:
                found["upward"].append(
                    f"{where}:{line}: {LAYERS[rank][0]} imports {target} ({LAYERS[_layer(target)][0]})")
            why = _private_module_problem(mod, target)
            if why:
                found["private"].append(f"{where}:{line}: {why}")
            if name and name.startswith("_") and not name.startswith("__") \
                    and not _private_name_ok(mod, target):
                found["private"].append(f"{where}:{line}: imports {target}.{name}")
        for source, attr, line in mod.reaches:
            if f"{source}.{attr}" not in PUBLIC_UNDERSCORES and not _private_name_ok(mod, source):
                found["private"].append(f"{where}:{line}: reaches {source}.{attr}")
        if mod.name.startswith(SANS_IO):
            for top, line in mod.externals:
                if top in IO_MODULES:
                    found["sans-io"].append(f"{where}:{line}: sans-IO module imports {top}")
            for target, _, line in mod.imports:
                if not target.startswith(SANS_IO + GENERATED) and target != "sesame":
                    found["sans-io"].append(f"{where}:{line}: sans-IO module imports {target}")
    return found


@pytest.mark.parametrize("kind", ["cycle", "upward", "sans-io", "private"])
def test_imports_point_down(kind: str) -> None:
    problems = violations()[kind]
    assert not problems, f"{len(problems)} {kind} problem(s):\n  " + "\n  ".join(problems)


def test_every_module_has_a_layer() -> None:
    assert all(_layer(name) >= 0 for name in build_graph())


def test_the_checker_sees_what_it_should(tmp_path: Path) -> None:
    """The checks fire on a small tree built to break each rule once."""
    pkg = tmp_path / "sesame"
    (pkg / "core").mkdir(parents=True)
    (pkg / "hub").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "_names.py").write_text("from sesame.hub import store\n")          # upward
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "_machine.py").write_text("def f():\n    import time\n")  # sans-IO, in a function
    (pkg / "hub" / "__init__.py").write_text("")
    (pkg / "hub" / "store.py").write_text(
        "from sesame import _names\n"                                      # cycle with _names
        "from sesame.core._machine import f\n"                             # private module
        "from sesame.cli import _registry\n"                               # private name
        "from twisted.internet import endpoints\nendpoints._parse('tcp:1')\n")  # private reach
    (pkg / "cli.py").write_text("_registry = None\n")
    found = violations(tmp_path)
    assert found["cycle"] == ["sesame._names <-> sesame.hub.store"]
    assert any("wire and leaves imports sesame.hub.store" in p for p in found["upward"])
    assert any("imports time" in p for p in found["sans-io"])
    assert sorted(p.split(": ", 1)[1] for p in found["private"]) == [
        "imports private module sesame.core._machine of package sesame.core",
        "imports sesame.cli._registry",
        "reaches twisted.internet.endpoints._parse",
    ]


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("statement", ["import sesame.remote", "import sesame.endpoints"])
def test_agent_side_does_not_load_the_hub(statement: str) -> None:
    loaded = _loaded_after(statement)
    assert "sqlite3" not in loaded
    assert "prometheus_client" not in loaded
    assert not any(m.startswith("sesame.hub.") for m in loaded)


def test_token_list_does_not_import_grpc(tmp_path: Path) -> None:
    loaded = _loaded_after(
        "from sesame.cli import main\n"
        f"assert main(['token', 'list', '--data-dir', {str(tmp_path)!r}]) == 0")
    assert "sqlite3" in loaded  # it did reach the store
    assert "grpc" not in loaded
    assert "twisted.internet.reactor" not in loaded


def test_plugins_stay_light() -> None:
    """Every ``clientFromString`` imports the plugin modules: they load no grpc."""
    loaded = _loaded_after("from twisted.plugin import IPlugin, getPlugins\nlist(getPlugins(IPlugin))")
    assert "grpc" not in loaded
    assert "sesame.endpoints" not in loaded


if __name__ == "__main__":
    tree = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    total = 0
    for kind, problems in violations(tree).items():
        print(f"{kind}: {len(problems)}")
        for p in problems:
            print(f"  {p}")
        total += len(problems)
    sys.exit(1 if total else 0)
