"""sesame.hub.tls: the hub's generated CA and certificate, exercised over real TLS with grpcio."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import stat
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from sesame.hub.tls import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    HUB_CERT_FILE,
    HUB_KEY_FILE,
    HubTLS,
    TLSSetupError,
    channel_credentials,
    ensure_hub_tls,
    issue_client_cert,
)

FILES = (CA_CERT_FILE, CA_KEY_FILE, HUB_CERT_FILE, HUB_KEY_FILE)
METHOD = "/sesame.test.Echo/Echo"
TIMEOUT = 10


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


class Server:
    """A real grpc server on 127.0.0.1 with a byte-echo method and the given credentials."""

    def __init__(self, creds: grpc.ServerCredentials) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.method_handlers_generic_handler(
            "sesame.test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        assert self.port
        self.server.start()

    def call(
        self,
        creds: grpc.ChannelCredentials,
        host: str = "127.0.0.1",
        options: tuple[tuple[str, str], ...] = (),
    ) -> bytes:
        with grpc.secure_channel(f"{host}:{self.port}", creds, options=options) as channel:
            return channel.unary_unary(METHOD)(b"ping", timeout=TIMEOUT)

    def stop(self) -> None:
        self.server.stop(None).wait(TIMEOUT)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "hub-data"


@pytest.fixture
def tls(data_dir: Path) -> HubTLS:
    return ensure_hub_tls(data_dir, ["hub.example.test", "10.9.8.7"])


@pytest.fixture
def serve() -> Iterator:
    servers: list[Server] = []

    def start(creds: grpc.ServerCredentials) -> Server:
        servers.append(Server(creds))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def _snapshot(data_dir: Path) -> dict[str, tuple[int, bytes]]:
    return {
        name: ((data_dir / name).stat().st_mtime_ns, (data_dir / name).read_bytes())
        for name in FILES
    }


def _sans(pem: bytes) -> tuple[set[str], set[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    cert = x509.load_pem_x509_certificate(pem)
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(ext.get_values_for_type(x509.DNSName)), set(ext.get_values_for_type(x509.IPAddress))


def _code(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return excinfo.value.code()  # type: ignore[attr-defined]


# -- real TLS -----------------------------------------------------------------


def test_client_trusting_the_ca_reaches_the_hub(tls: HubTLS, serve) -> None:
    server = serve(tls.server_credentials())
    creds = channel_credentials(tls.ca_pem)
    assert server.call(creds) == b"ping"
    assert server.call(creds, host="localhost") == b"ping"
    # The DNS SAN is honoured too (the connection still goes to 127.0.0.1).
    override = (("grpc.ssl_target_name_override", "hub.example.test"),)
    assert server.call(creds, options=override) == b"ping"
    assert server.call(HubTLS.channel_credentials(tls.ca_pem)) == b"ping"


def test_name_outside_the_sans_is_refused(tls: HubTLS, serve) -> None:
    server = serve(tls.server_credentials())
    override = (("grpc.ssl_target_name_override", "elsewhere.example.test"),)
    with pytest.raises(grpc.RpcError) as excinfo:
        server.call(channel_credentials(tls.ca_pem), options=override)
    assert _code(excinfo) == grpc.StatusCode.UNAVAILABLE


def test_wrong_ca_is_unavailable(tls: HubTLS, serve, tmp_path: Path) -> None:
    other = ensure_hub_tls(tmp_path / "other", [])
    assert other.ca_pem != tls.ca_pem
    server = serve(tls.server_credentials())
    with pytest.raises(grpc.RpcError) as excinfo:
        server.call(channel_credentials(other.ca_pem))
    assert _code(excinfo) == grpc.StatusCode.UNAVAILABLE


def test_mtls_requires_a_client_cert_from_the_ca(tls: HubTLS, serve, tmp_path: Path) -> None:
    server = serve(tls.server_credentials(require_client_cert=True))
    with pytest.raises(grpc.RpcError) as excinfo:
        server.call(channel_credentials(tls.ca_pem))
    assert _code(excinfo) == grpc.StatusCode.UNAVAILABLE

    cert, key = issue_client_cert(tls.data_dir, "alice")
    assert server.call(channel_credentials(tls.ca_pem, cert, key)) == b"ping"

    other = ensure_hub_tls(tmp_path / "other", [])
    foreign_cert, foreign_key = issue_client_cert(other.data_dir, "mallory")
    with pytest.raises(grpc.RpcError) as excinfo:
        server.call(channel_credentials(tls.ca_pem, foreign_cert, foreign_key))
    assert _code(excinfo) == grpc.StatusCode.UNAVAILABLE


def test_optional_client_cert_with_explicit_client_ca(tls: HubTLS, serve) -> None:
    server = serve(tls.server_credentials(client_ca=tls.ca_pem))
    assert server.call(channel_credentials(tls.ca_pem)) == b"ping"
    cert, key = issue_client_cert(tls.data_dir, "bob")
    assert server.call(channel_credentials(tls.ca_pem, cert, key)) == b"ping"


def test_client_cert_and_key_go_together(tls: HubTLS) -> None:
    cert, _ = issue_client_cert(tls.data_dir, "carol")
    with pytest.raises(ValueError, match="both or neither"):
        channel_credentials(tls.ca_pem, client_cert=cert)


# -- certificate contents -----------------------------------------------------


def test_certificates_have_the_required_shape(tls: HubTLS) -> None:
    assert tls.created and tls.reissued
    ca = x509.load_pem_x509_certificate(tls.ca_pem)
    hub = x509.load_pem_x509_certificate(tls.cert_pem)

    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    ca_days = (ca.not_valid_after_utc - ca.not_valid_before_utc).days
    assert 3650 <= ca_days <= 3651

    hub.verify_directly_issued_by(ca)
    assert not hub.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = hub.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert 825 <= (hub.not_valid_after_utc - hub.not_valid_before_utc).days <= 826
    assert hub.not_valid_before_utc <= datetime.datetime.now(datetime.UTC)

    dns, ips = _sans(tls.cert_pem)
    assert {"localhost", "hub.example.test"} <= dns
    assert {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.9.8.7")} <= ips
    assert {"localhost", "hub.example.test", "127.0.0.1", "::1", "10.9.8.7"} <= set(tls.hosts)


def test_bracketed_ipv6_and_case_are_normalized(data_dir: Path) -> None:
    tls = ensure_hub_tls(data_dir, ["[2001:db8::5]", "Hub.Example.TEST."])
    dns, ips = _sans(tls.cert_pem)
    assert ipaddress.ip_address("2001:db8::5") in ips
    assert "hub.example.test" in dns
    again = ensure_hub_tls(data_dir, ["2001:db8::5", "hub.example.test"])
    assert not again.reissued


@pytest.mark.parametrize("bad", ["", "[]", "a b", "host:443", "user@host"])
def test_bad_host_is_refused_before_anything_is_written(data_dir: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        ensure_hub_tls(data_dir, [bad])
    assert not data_dir.exists()


def test_client_cert_is_for_client_auth(tls: HubTLS) -> None:
    cert_pem, key_pem = issue_client_cert(tls.data_dir, "alice")
    cert = x509.load_pem_x509_certificate(cert_pem)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(tls.ca_pem))
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert cert.subject.rfc4514_string() == "CN=alice"
    assert b"PRIVATE KEY" in key_pem
    assert set(FILES) <= {p.name for p in tls.data_dir.iterdir()}  # nothing else was touched


def test_client_cert_needs_a_ca(tmp_path: Path) -> None:
    with pytest.raises(TLSSetupError, match="no CA"):
        issue_client_cert(tmp_path, "alice")


# -- files: permissions, reuse, reissue ---------------------------------------


def test_key_files_and_directory_are_private(tls: HubTLS) -> None:
    assert stat.S_IMODE(tls.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(tls.ca_key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(tls.key_path.stat().st_mode) == 0o600
    assert tls.ca_path == tls.data_dir / "ca.pem"
    assert tls.key_pem == tls.key_path.read_bytes()
    assert "PRIVATE" not in repr(tls)


def test_rerun_reuses_everything(tls: HubTLS) -> None:
    before = _snapshot(tls.data_dir)
    again = ensure_hub_tls(tls.data_dir, ["10.9.8.7", "hub.example.test"])
    assert not again.created and not again.reissued
    assert _snapshot(tls.data_dir) == before
    assert (again.ca_pem, again.cert_pem, again.key_pem) == (tls.ca_pem, tls.cert_pem, tls.key_pem)
    # A subset of the hosts is covered too.
    assert not ensure_hub_tls(tls.data_dir, []).reissued
    assert _snapshot(tls.data_dir) == before


def test_new_host_reissues_the_hub_cert_only(tls: HubTLS, serve) -> None:
    before = _snapshot(tls.data_dir)
    again = ensure_hub_tls(tls.data_dir, ["new.example.test"])
    assert not again.created and again.reissued
    after = _snapshot(tls.data_dir)
    assert after[CA_CERT_FILE] == before[CA_CERT_FILE]
    assert after[CA_KEY_FILE] == before[CA_KEY_FILE]
    assert after[HUB_CERT_FILE][1] != before[HUB_CERT_FILE][1]
    assert after[HUB_KEY_FILE][1] != before[HUB_KEY_FILE][1]
    assert stat.S_IMODE(again.key_path.stat().st_mode) == 0o600
    dns, ips = _sans(again.cert_pem)
    # New host added, earlier ones kept.
    assert {"new.example.test", "hub.example.test", "localhost"} <= dns
    assert ipaddress.ip_address("10.9.8.7") in ips
    # The old ca.pem still trusts the new certificate.
    server = serve(again.server_credentials())
    assert server.call(channel_credentials(tls.ca_pem)) == b"ping"


def test_hub_cert_from_another_ca_is_reissued(tls: HubTLS, tmp_path: Path) -> None:
    other = ensure_hub_tls(tmp_path / "other", ["hub.example.test", "10.9.8.7"])
    tls.cert_path.write_bytes(other.cert_pem)
    tls.key_path.write_bytes(other.key_pem)
    again = ensure_hub_tls(tls.data_dir, ["hub.example.test"])
    assert again.reissued and not again.created
    ca = x509.load_pem_x509_certificate(tls.ca_pem)
    x509.load_pem_x509_certificate(again.cert_pem).verify_directly_issued_by(ca)


def test_hub_key_not_matching_cert_is_reissued(tls: HubTLS, tmp_path: Path) -> None:
    other = ensure_hub_tls(tmp_path / "other", [])
    tls.key_path.write_bytes(other.key_pem)
    again = ensure_hub_tls(tls.data_dir, [])
    assert again.reissued
    assert again.key_pem != other.key_pem


def test_loosened_key_permissions_are_tightened(tls: HubTLS) -> None:
    tls.ca_key_path.chmod(0o644)
    tls.key_path.chmod(0o640)
    ensure_hub_tls(tls.data_dir, [])
    assert stat.S_IMODE(tls.ca_key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(tls.key_path.stat().st_mode) == 0o600


@pytest.mark.parametrize("missing", [CA_KEY_FILE, CA_CERT_FILE])
def test_incomplete_ca_is_an_error_not_a_new_ca(tls: HubTLS, missing: str) -> None:
    (tls.data_dir / missing).unlink()
    before = {p.name: p.read_bytes() for p in tls.data_dir.iterdir()}
    with pytest.raises(TLSSetupError, match=missing):
        ensure_hub_tls(tls.data_dir, [])
    assert {p.name: p.read_bytes() for p in tls.data_dir.iterdir()} == before


def test_mismatched_ca_key_is_an_error(tls: HubTLS, tmp_path: Path) -> None:
    other = ensure_hub_tls(tmp_path / "other", [])
    tls.ca_key_path.write_bytes(other.ca_key_path.read_bytes())
    with pytest.raises(TLSSetupError, match="does not belong"):
        ensure_hub_tls(tls.data_dir, [])


def test_key_material_is_never_logged(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    tls = ensure_hub_tls(data_dir, ["hub.example.test"])
    ensure_hub_tls(data_dir, ["other.example.test"])
    issue_client_cert(data_dir, "alice")
    assert "ca.pem" in caplog.text  # the CA path is reported ...
    assert "PRIVATE KEY" not in caplog.text  # ... key material never
    for line in tls.key_pem.decode().splitlines()[1:-1]:
        assert line not in caplog.text
