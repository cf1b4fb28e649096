"""Regenerate the protobuf/gRPC Python modules from the ``.proto`` files in ``proto/``.

Usage (from the repository root)::

    python -m sesame._regen        # or: make proto

The generated ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` files are committed; the
freshness test in ``tests/test_wire.py`` fails when they no longer match what this module
produces.

``grpcio-tools`` is a development/test dependency only, so it is imported lazily inside the
functions below and never by the runtime package.
"""

from __future__ import annotations

import contextlib
import filecmp
import importlib.metadata
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "proto"

#: File name endings of everything protoc writes for one ``.proto`` file.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

# grpc_tools.protoc installs import hooks that compile .proto files on the fly when this
# variable is unset; those hooks could hide a missing generated module, so keep them off.
_DISABLE_DYNAMIC_STUBS = "GRPC_PYTHON_DISABLE_DYNAMIC_STUBS"


def proto_files(proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Every ``.proto`` file under ``proto_dir``, as paths relative to it, sorted."""
    return sorted(p.relative_to(proto_dir) for p in proto_dir.rglob("*.proto"))


def _protoc_main() -> object:
    """Import ``grpc_tools.protoc`` without its dynamic-stub import hooks; return ``main``."""
    if "grpc_tools.protoc" not in sys.modules:
        previous = os.environ.get(_DISABLE_DYNAMIC_STUBS)
        os.environ[_DISABLE_DYNAMIC_STUBS] = "1"
        try:
            import grpc_tools.protoc  # noqa: F401  (imported for its side effect on sys.modules)
        finally:
            if previous is None:
                del os.environ[_DISABLE_DYNAMIC_STUBS]
            else:
                os.environ[_DISABLE_DYNAMIC_STUBS] = previous
    return sys.modules["grpc_tools.protoc"].main


def _grpc_tools_include() -> Path:
    """The directory of well-known ``google/protobuf/*.proto`` files bundled with grpcio-tools."""
    import grpc_tools

    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    if not (include / "google" / "protobuf" / "empty.proto").is_file():
        raise RuntimeError(f"grpcio-tools has no bundled well-known protos at {include}")
    return include


def _googleapis_include() -> Path:
    """The directory holding googleapis-common-protos' ``google/api`` and ``google/rpc`` protos."""
    wanted = (Path("google/api/annotations.proto"), Path("google/rpc/status.proto"))
    candidates: list[Path] = []
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("googleapis-common-protos")
        candidates.append(Path(str(dist.locate_file(""))))
    candidates.extend(Path(entry) for entry in sys.path if entry)
    for root in candidates:
        if all((root / rel).is_file() for rel in wanted):
            return root.resolve()
    raise RuntimeError(
        "cannot find google/api/*.proto and google/rpc/*.proto: install googleapis-common-protos"
    )


def include_paths(proto_dir: Path = PROTO_DIR) -> list[Path]:
    """The ``-I`` directories, in search order."""
    return [proto_dir, _grpc_tools_include(), _googleapis_include()]


def _run_protoc(args: Sequence[str], proto_dir: Path) -> None:
    """Run protoc (in-process) with ``args`` over every ``.proto`` file under ``proto_dir``."""
    main = _protoc_main()
    argv = ["grpc_tools.protoc", *(f"-I{p}" for p in include_paths(proto_dir)), *args]
    argv.extend(str(proto_dir / p) for p in proto_files(proto_dir))
    status = main(argv)  # type: ignore[operator]
    if status != 0:
        raise RuntimeError(f"protoc failed with exit status {status}: {' '.join(argv)}")


@contextlib.contextmanager
def _scratch_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="sesame-regen-") as tmp:
        yield Path(tmp)


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Compile every ``.proto`` under ``proto_dir`` into Python modules below ``out_dir``.

    Emits ``--python_out``, ``--pyi_out`` and ``--grpc_python_out``. Files whose content is
    unchanged are not rewritten. Returns the paths of all generated files (sorted).
    """
    out_dir = Path(out_dir)
    with _scratch_dir() as scratch:
        _run_protoc(
            [f"--python_out={scratch}", f"--pyi_out={scratch}", f"--grpc_python_out={scratch}"],
            proto_dir,
        )
        written: list[Path] = []
        for src in sorted(p for p in scratch.rglob("*") if p.is_file()):
            dest = out_dir / src.relative_to(scratch)
            if not (dest.is_file() and filecmp.cmp(src, dest, shallow=False)):
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest)
            written.append(dest)
    return written


def descriptor_set(include_imports: bool = True, proto_dir: Path = PROTO_DIR) -> bytes:
    """A serialized ``google.protobuf.FileDescriptorSet`` of every file under ``proto_dir``.

    With ``include_imports`` the imported files (well-known types, googleapis) are included
    too, dependencies before dependants.
    """
    with _scratch_dir() as scratch:
        out = scratch / "descriptors.pb"
        args = [f"--descriptor_set_out={out}"]
        if include_imports:
            args.append("--include_imports")
        _run_protoc(args, proto_dir)
        return out.read_bytes()


def ensure_packages(out_dir: Path, files: Sequence[Path]) -> list[Path]:
    """Create an empty ``__init__.py`` in every directory between ``out_dir`` and ``files``.

    Existing ``__init__.py`` files are left untouched. Returns the files created.
    """
    out_dir = Path(out_dir).resolve()
    created: list[Path] = []
    dirs: set[Path] = set()
    for f in files:
        parent = Path(f).resolve().parent
        while parent != out_dir and out_dir in parent.parents:
            dirs.add(parent)
            parent = parent.parent
    for d in sorted(dirs):
        init = d / "__init__.py"
        if not init.exists():
            init.touch()
            created.append(init)
    return created


def main(argv: Sequence[str] | None = None) -> int:
    out_dir = Path(argv[0]) if argv else REPO_ROOT
    files = generate(out_dir)
    created = ensure_packages(out_dir, files)
    for path in files + created:
        try:
            shown = path.relative_to(out_dir)
        except ValueError:
            shown = path
        print(shown)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
