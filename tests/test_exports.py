"""
The public surface: every name in each public module's ``__all__`` imports, has a
docstring, and the modules that moved in the layout step still import (for one release)
as the very module they moved to.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import subprocess
import sys
import warnings

import pytest

import sesame

#: The modules users import (README, docs/); each keeps its ``__all__``.
PUBLIC_MODULES = [
    "sesame.tunnel",
    "sesame.netconn",
    "sesame.endpoints",
    "sesame.relay",
    "sesame.forward",
    "sesame.remote",
    "sesame.hub",
    "sesame.cli",
    "sesame.tap",
    "sesame.testing.hub",
    "sesame.testing.interop",
    "sesame.testing.redis",
]

#: old name -> where it lives now
MOVED = {
    "sesame.mgmt": "sesame.hub.mgmt",
    "sesame.frontdoor": "sesame.hub.frontdoor",
    "sesame.metrics": "sesame.hub.metrics",
    "sesame.dashboard": "sesame.hub.dashboard",
    "sesame._bridge": "sesame.bridge",
}


def _all(name: str) -> list[str]:
    module = importlib.import_module(name)
    names = getattr(module, "__all__", None)
    assert names, f"{name} has no __all__"
    return list(names)


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_every_name_in_all_imports(name: str) -> None:
    module = importlib.import_module(name)
    for attr in _all(name):
        assert hasattr(module, attr), f"{name}.__all__ names {attr!r}, which is not there"
        exec(f"from {name} import {attr}", {})  # the form users write


def _documentable(obj: object) -> bool:
    return inspect.isclass(obj) or inspect.isfunction(obj)


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_classes_and_functions_have_docstrings(name: str) -> None:
    module = importlib.import_module(name)
    assert (module.__doc__ or "").strip(), f"{name} has no module docstring"
    missing = []
    for attr in _all(name):
        obj = getattr(module, attr)
        if not _documentable(obj):
            continue
        if not (inspect.getdoc(obj) or "").strip():
            missing.append(attr)
            continue
        if inspect.isclass(obj) and obj.__module__.startswith("sesame"):
            for meth_name, meth in list(vars(obj).items()):
                if meth_name.startswith("_") or not callable(meth):
                    continue
                if meth_name[:1].islower() and not (inspect.getdoc(meth) or "").strip():
                    # Interface methods (Twisted's camelCase ITransport & co.) inherit
                    # their contract from the interface; ours must say what they do.
                    if any(meth_name in i.names() for i in _provided_interfaces(obj)):
                        continue
                    missing.append(f"{attr}.{meth_name}")
    assert not missing, f"{name}: no docstring on " + ", ".join(missing)


def _provided_interfaces(cls: type) -> list:
    from zope.interface import implementedBy

    return list(implementedBy(cls).flattened())


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
def test_moved_modules_keep_their_old_name_for_one_release(old: str, new: str) -> None:
    code = (
        "import importlib, warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        f"new = importlib.import_module({new!r})\n"
        "assert old is new, (old, new)\n"
        "assert any(issubclass(x.category, DeprecationWarning) and"
        f" {new!r} in str(x.message) for x in w), [str(x.message) for x in w]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_version_is_the_package_version() -> None:
    assert isinstance(sesame.__version__, str) and sesame.__version__
    assert importlib.metadata.version("sesame-tunnel") == sesame.__version__


def test_importing_sesame_is_free() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = subprocess.run(
            [sys.executable, "-c", "import sys, sesame; print(sorted(m for m in sys.modules"
             " if m.startswith(('sesame', 'twisted', 'grpc'))))"],
            capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.strip() == "['sesame']"
