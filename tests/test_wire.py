"""Wire-schema checks: generated code is fresh, the schema matches upstream, encodings are exact.

The upstream schema is pinned in ``tests/data/upstream-fields.tsv`` (a dump of the upstream
``.proto`` files of joeycumines/sesame and jhump/grpctunnel); see PROTOCOL.md section 1.

Note: nothing here imports ``sesame.grpctunnel.v1.tunnel_pb2`` into the test process. Its
``grpctunnel.v1.*`` symbols would collide in protobuf's default descriptor pool with the ones
registered by the grpctunnel-py test dependency, breaking any later test that imports that
package. The grpctunnel.v1 checks use a private descriptor pool or a subprocess instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from sesame import _regen
from sesame.type import grpcmetadata_pb2, grpctunnel_pb2

REPO = Path(__file__).resolve().parent.parent
TSV = REPO / "tests" / "data" / "upstream-fields.tsv"
SHARED_TSV = REPO.parent / "shared" / "wire" / "upstream-fields.tsv"

#: Proto packages whose schema must be exactly the upstream one (no additions either).
UPSTREAM_PACKAGES = ("sesame.type", "sesame.v1alpha1", "grpctunnel.v1")

FDP = descriptor_pb2.FieldDescriptorProto


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def descriptors() -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString(_regen.descriptor_set(include_imports=True))


@pytest.fixture(scope="module")
def private_pool(descriptors: descriptor_pb2.FileDescriptorSet) -> descriptor_pool.DescriptorPool:
    """All of our schema (plus imports) in a pool of its own, away from the default pool."""
    pool = descriptor_pool.DescriptorPool()
    for fd in descriptors.file:  # --include_imports lists dependencies first
        pool.AddSerializedFile(fd.SerializeToString())
    return pool


def message_class(pool: descriptor_pool.DescriptorPool, name: str) -> type[Message]:
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


def _field_type(field: descriptor_pb2.FieldDescriptorProto) -> str:
    if field.type in (FDP.TYPE_MESSAGE, FDP.TYPE_ENUM, FDP.TYPE_GROUP):
        name = field.type_name.lstrip(".")
    else:
        name = FDP.Type.Name(field.type).removeprefix("TYPE_").lower()
    return f"repeated {name}" if field.label == FDP.LABEL_REPEATED else name


def _message_rows(prefix: str, msg: descriptor_pb2.DescriptorProto) -> Iterator[str]:
    full = f"{prefix}.{msg.name}"
    for field in msg.field:
        oneof = "-"
        if field.HasField("oneof_index") and not field.proto3_optional:
            oneof = msg.oneof_decl[field.oneof_index].name
        yield f"{full}\t{field.name}\t{field.number}\t{_field_type(field)}\t{oneof}"
    for nested in msg.nested_type:
        yield from _message_rows(full, nested)
    for enum in msg.enum_type:
        yield from _enum_rows(full, enum)


def _enum_rows(prefix: str, enum: descriptor_pb2.EnumDescriptorProto) -> Iterator[str]:
    for value in enum.value:
        yield f"{prefix}.{enum.name}\t{value.name}\t{value.number}\tenum\t-"


def _stream(flag: bool, type_name: str) -> str:
    return f"stream {type_name}" if flag else type_name


def schema_rows(fds: descriptor_pb2.FileDescriptorSet) -> list[str]:
    """Dump fields, enum values and methods in the format of upstream-fields.tsv."""
    rows: list[str] = []
    for fd in fds.file:
        if fd.name.startswith("google/"):
            continue
        for msg in fd.message_type:
            rows.extend(_message_rows(fd.package, msg))
        for enum in fd.enum_type:
            rows.extend(_enum_rows(fd.package, enum))
        for service in fd.service:
            for method in service.method:
                rows.append(
                    f"/{fd.package}.{service.name}/{method.name}"
                    f"\t{_stream(method.client_streaming, method.input_type)}"
                    f"\t{_stream(method.server_streaming, method.output_type)}"
                )
    return rows


def upstream_rows() -> list[str]:
    lines = TSV.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def _in_upstream_package(row: str) -> bool:
    name = row.split("\t", 1)[0].lstrip("/")
    return any(name.startswith(f"{pkg}.") for pkg in UPSTREAM_PACKAGES)


def _generated_in_repo() -> set[Path]:
    found: set[Path] = set()
    for suffix in _regen.GENERATED_SUFFIXES:
        found.update(p.relative_to(REPO) for p in (REPO / "sesame").rglob(f"*{suffix}"))
    return found


# --------------------------------------------------------------------------------------------
# Generated code is up to date
# --------------------------------------------------------------------------------------------


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    generated = {p.relative_to(tmp_path) for p in _regen.generate(tmp_path)}
    assert generated, "protoc generated nothing"
    missing = sorted(str(p) for p in generated if not (REPO / p).is_file())
    stale = sorted(
        str(p)
        for p in generated
        if (REPO / p).is_file() and (REPO / p).read_bytes() != (tmp_path / p).read_bytes()
    )
    orphaned = sorted(str(p) for p in _generated_in_repo() - generated)
    problems = [
        *(f"missing:  {p}" for p in missing),
        *(f"stale:    {p}" for p in stale),
        *(f"orphaned: {p} (no .proto produces it any more)" for p in orphaned),
    ]
    assert not problems, (
        "generated protobuf code does not match proto/; run `make proto` "
        "(python -m sesame._regen) and commit the result:\n  " + "\n  ".join(problems)
    )


def test_generated_packages_have_init_files() -> None:
    dirs = {(REPO / p).parent for p in _generated_in_repo()}
    for d in sorted(dirs):
        while d != REPO:
            assert (d / "__init__.py").is_file(), f"{d.relative_to(REPO)} lacks __init__.py"
            d = d.parent


def test_generated_modules_import_cleanly() -> None:
    """Every generated module imports without warnings under the installed runtime.

    Runs in a subprocess so that sesame.grpctunnel.v1 never enters this process (see the
    module docstring), and round-trips a grpctunnel.v1 settings frame through the real module.
    """
    modules = sorted(
        ".".join(p.with_suffix("").parts) for p in _generated_in_repo() if p.suffix == ".py"
    )
    script = textwrap.dedent(
        """
        import importlib, sys
        for name in sys.argv[1:]:
            importlib.import_module(name)
        from sesame.grpctunnel.v1 import tunnel_pb2 as t
        frame = t.ServerToClient(stream_id=-1)
        frame.settings.supported_protocol_revisions[:] = [t.REVISION_ZERO, t.REVISION_ONE]
        frame.settings.initial_window_size = 65536
        again = t.ServerToClient.FromString(frame.SerializeToString())
        assert again == frame and again.WhichOneof("frame") == "settings", again
        assert again.stream_id == -1
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", script, *modules],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------------
# Schema equals upstream
# --------------------------------------------------------------------------------------------


def test_committed_tsv_matches_shared_copy() -> None:
    if not SHARED_TSV.is_file():
        pytest.skip(f"{SHARED_TSV} not present")
    assert SHARED_TSV.read_bytes() == TSV.read_bytes(), (
        f"{SHARED_TSV} changed; review the difference and update {TSV.relative_to(REPO)} "
        "(and proto/) to match"
    )


def test_schema_contains_every_upstream_row(descriptors: descriptor_pb2.FileDescriptorSet) -> None:
    ours = set(schema_rows(descriptors))
    missing = [row for row in upstream_rows() if row not in ours]
    assert not missing, "rows of upstream-fields.tsv missing from proto/:\n" + "\n".join(missing)


def test_schema_has_nothing_beyond_upstream(descriptors: descriptor_pb2.FileDescriptorSet) -> None:
    upstream = set(upstream_rows())
    extra = [r for r in schema_rows(descriptors) if _in_upstream_package(r) and r not in upstream]
    assert not extra, "rows in proto/ that upstream does not have:\n" + "\n".join(extra)


def test_fieldless_messages_exist(private_pool: descriptor_pool.DescriptorPool) -> None:
    """Messages without fields never show up in the TSV; check them by name (PROTOCOL.md 1.5-1.6)."""
    for name in (
        "sesame.v1alpha1.TunnelResponse.Connect",
        "sesame.v1alpha1.StreamRequest.Dial",
        "sesame.v1alpha1.StreamResponse.Connect",
        "sesame.v1alpha1.Endpoint.Tunnel",
    ):
        assert not private_pool.FindMessageTypeByName(name).fields, name


def test_upstream_rows_are_unique() -> None:
    rows = upstream_rows()
    assert len(rows) == len(set(rows))


def test_management_api_http_rules(descriptors: descriptor_pb2.FileDescriptorSet) -> None:
    """google.api.http bindings of sesame.v1alpha1.Sesame (PROTOCOL.md section 1.6)."""
    from google.api import annotations_pb2, http_pb2

    expected = {
        "CreateRemote": ("post", "/v1alpha1/{parent=namespaces/*}/remotes", "remote"),
        "GetRemote": ("get", "/v1alpha1/{name=namespaces/*/remotes/*}", ""),
        "DeleteRemote": ("delete", "/v1alpha1/{name=namespaces/*/remotes/*}", ""),
        "UpdateRemote": ("patch", "/v1alpha1/{name=namespaces/*/remotes/*}", "remote"),
        "ListRemotes": ("get", "/v1alpha1/{parent=namespaces/*}/remotes", ""),
        "CreateEndpoint": (
            "post",
            "/v1alpha1/{parent=namespaces/*/remotes/*}/endpoints",
            "endpoint",
        ),
        "GetEndpoint": ("get", "/v1alpha1/{name=namespaces/*/remotes/*/endpoints/*}", ""),
        "DeleteEndpoint": ("delete", "/v1alpha1/{name=namespaces/*/remotes/*/endpoints/*}", ""),
        "UpdateEndpoint": (
            "patch",
            "/v1alpha1/{name=namespaces/*/remotes/*/endpoints/*}",
            "endpoint",
        ),
        "ListEndpoints": ("get", "/v1alpha1/{parent=namespaces/*/remotes/*}/endpoints", ""),
        "Proxy": ("post", "/v1alpha1/proxy", "*"),
    }
    (fd,) = [f for f in descriptors.file if f.name == "sesame/v1alpha1/sesame.proto"]
    (service,) = fd.service
    assert service.name == "Sesame"
    found = {}
    for method in service.method:
        # Extensions are unknown fields of the plain descriptor_pb2 options; re-parse them.
        options = descriptor_pb2.MethodOptions.FromString(method.options.SerializeToString())
        rule: http_pb2.HttpRule = options.Extensions[annotations_pb2.http]
        verb = rule.WhichOneof("pattern")
        found[method.name] = (verb, getattr(rule, verb), rule.body)
    assert found == expected


def test_output_only_fields(descriptors: descriptor_pb2.FileDescriptorSet) -> None:
    from google.api import field_behavior_pb2

    (fd,) = [f for f in descriptors.file if f.name == "sesame/v1alpha1/sesame.proto"]
    output_only = set()
    for msg in fd.message_type:
        for field in msg.field:
            opts = descriptor_pb2.FieldOptions.FromString(field.options.SerializeToString())
            if field_behavior_pb2.OUTPUT_ONLY in opts.Extensions[field_behavior_pb2.field_behavior]:
                output_only.add(f"{msg.name}.{field.name}")
    assert output_only == {
        "Remote.name",
        "Remote.create_time",
        "Endpoint.name",
        "Endpoint.create_time",
        "Namespace.name",
    }


# --------------------------------------------------------------------------------------------
# Exact encodings
# --------------------------------------------------------------------------------------------


def test_sesame_new_stream_encoding() -> None:
    frame = grpctunnel_pb2.ClientToServer(stream_id=1)
    frame.new_stream.method = "/a.B/C"
    frame.new_stream.header.SetInParent()  # empty metadata is still sent (PROTOCOL.md 1.3.1)
    # 08 01: stream_id=1; 1a 0a: field 3 (new_stream), length-delimited, 10 bytes;
    # 0a 06 "/a.B/C": method; 12 00: header, present but empty.
    assert frame.SerializeToString() == b"\x08\x01\x1a\x0a\x0a\x06/a.B/C\x12\x00"

    bare = grpctunnel_pb2.ClientToServer(stream_id=1)
    bare.new_stream.SetInParent()
    assert bare.SerializeToString() == b"\x08\x01\x1a\x00"
    assert grpctunnel_pb2.ClientToServer.FromString(b"\x08\x01\x1a\x00").HasField("new_stream")


def test_sesame_metadata_encoding() -> None:
    md = grpcmetadata_pb2.GrpcMetadata()
    md.data["k-bin"].bin.values.append(b"\x00\xff")
    # 0a 0f: one data entry of 15 bytes = 0a 05 "k-bin" (key) + 12 06 (value: Value) ->
    # 12 04 (Value.bin, field 2) -> 0a 02 00 ff (Bin.values[0], raw bytes).
    assert md.SerializeToString() == b"\x0a\x0f\x0a\x05k-bin\x12\x06\x12\x04\x0a\x02\x00\xff"
    empty_key = grpcmetadata_pb2.GrpcMetadata()
    empty_key.data["x"].str.SetInParent()
    assert empty_key.SerializeToString() == b"\x0a\x07\x0a\x01x\x12\x02\x0a\x00"


def test_sesame_close_stream_encoding() -> None:
    frame = grpctunnel_pb2.ServerToClient(stream_id=3)
    frame.close_stream.status.code = 5
    frame.close_stream.status.message = "nope"
    # 08 03; 32 0a: close_stream (field 6), 10 bytes; 12 08: status (field 2), 8 bytes;
    # 08 05: code; 12 04 "nope": message.
    assert frame.SerializeToString() == b"\x08\x03\x32\x0a\x12\x08\x08\x05\x12\x04nope"


def test_grpctunnel_v1_settings_frame(private_pool: descriptor_pool.DescriptorPool) -> None:
    server_to_client = message_class(private_pool, "grpctunnel.v1.ServerToClient")
    frame = server_to_client(stream_id=-1)
    frame.settings.supported_protocol_revisions.extend([0, 1])  # REVISION_ZERO, REVISION_ONE
    frame.settings.initial_window_size = 65536
    wire = frame.SerializeToString()
    # int64 -1 is a 10-byte varint; settings is field 6; the revisions are packed.
    assert wire == (
        b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01\x32\x08\x0a\x02\x00\x01\x10\x80\x80\x04"
    )
    again = server_to_client.FromString(wire)
    assert again == frame
    assert again.stream_id == -1
    assert again.WhichOneof("frame") == "settings"
    assert list(again.settings.supported_protocol_revisions) == [0, 1]


def test_grpctunnel_v1_new_stream_encoding(private_pool: descriptor_pool.DescriptorPool) -> None:
    client_to_server = message_class(private_pool, "grpctunnel.v1.ClientToServer")
    frame = client_to_server(stream_id=1)
    frame.new_stream.method_name = "/a.B/C"
    frame.new_stream.initial_window_size = 65536
    frame.new_stream.protocol_revision = 1
    # new_stream is field 2 here (3 in sesame.type).
    assert frame.SerializeToString() == (b"\x08\x01\x12\x0e\x0a\x06/a.B/C\x18\x80\x80\x04\x20\x01")


#: PROTOCOL.md 2.8: the data-bytes base chosen so the worst-case frame is one HTTP/2 frame.
MAX_FRAME = 16384
CHUNK_BASE = 16356
U64_MAX = 2**64 - 1
I32_MIN = -(2**31)


@pytest.mark.parametrize(
    "frame_type", [grpctunnel_pb2.ClientToServer, grpctunnel_pb2.ServerToClient]
)
def test_worst_case_sesame_data_frame_fits_http2_frame(frame_type: type[Message]) -> None:
    frame = frame_type(stream_id=U64_MAX)
    frame.message.size = I32_MIN
    frame.message.data = b"\xff" * CHUNK_BASE
    assert frame.ByteSize() == len(frame.SerializeToString()) == MAX_FRAME

    continuation = frame_type(stream_id=U64_MAX, message_data=b"\xff" * CHUNK_BASE)
    assert continuation.ByteSize() <= MAX_FRAME
