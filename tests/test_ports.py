"""
Ports are ASCII digits, everywhere a user or a peer writes one (issue 10, defect 8).

``str.isdigit`` takes ``²``, ``٢`` (Arabic-Indic) and ``２`` (fullwidth); ``int`` then refuses
the first (an uncaught ValueError: UNKNOWN over gRPC) and reads the others as numbers
(``127.0.0.1:٢٢`` dialled port 22).  One parser, :func:`sesame._names.parse_port`, serves
dial targets, ``--allow`` patterns, the ``port=`` key of ``sesame:`` endpoint strings and
front-door routes; the NetConn dials are checked end to end in
``tests/test_netconn_hostile.py``.
"""

from __future__ import annotations

import pytest
from twisted.internet import endpoints, reactor

from sesame import _names as N
from sesame.hub._target import parse_target
from sesame.hub.store import InvalidArgument, SQLiteStore, server_description_problem
from sesame.netconn import NetConnAddress, PatternError
from sesame.netconn._allowlist import Allowlist
from sesame.type import netaddr_pb2

NOT_PORTS = ("²", "٢٢", "２２", "٢", "²²", "߂߂", "+22", "-22", " 22", "22 ", "2_2", "22\n",
             "", "0x16", "1" * 5000, "000022", "0", "65536", "70000")


@pytest.mark.parametrize("text, port", [("1", 1), ("22", 22), ("08080", 8080),
                                        ("65535", 65535), ("00022", 22)])
def test_parse_port_takes_ascii_digits(text, port):
    assert N.parse_port(text) == port


@pytest.mark.parametrize("text", NOT_PORTS)
def test_parse_port_refuses_everything_else(text):
    with pytest.raises(ValueError) as info:
        N.parse_port(text, "what")
    shown = repr(text) if len(text) <= 20 else f"{text[:20]!r}... ({len(text)} characters)"
    assert str(info.value) == f"what: port {shown} is not a number in 1-65535"


def test_parse_port_low_zero():
    assert N.parse_port("0", low=0) == 0
    with pytest.raises(ValueError, match="0-65535"):
        N.parse_port("٠", low=0)


def test_ascii_digits():
    assert N.ascii_digits("0123456789")
    for text in ("", "²", "٢", "２", "1 ", "-1", "1_0"):
        assert not N.ascii_digits(text), text


@pytest.mark.parametrize("ports", ["²", "٢٢", "２２", "1-٢٢", "٢-22", "22-²", "+22", "2_2"])
def test_allow_patterns_refuse_non_ascii_ports(ports):
    pattern = f"127.0.0.1:{ports}"
    with pytest.raises(PatternError) as info:
        Allowlist([pattern])
    assert repr(pattern) in str(info.value) and "is not a number in 1-65535" in str(info.value)


@pytest.mark.parametrize("port", ["²", "٢٢", "２２", "+22"])
def test_endpoint_port_key_refuses_non_ascii_digits(port, monkeypatch):
    for var in ("SESAME_HUB", "SESAME_TOKEN", "SESAME_TOKEN_FILE", "SESAME_CA", "SESAME_TLS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError) as info:
        endpoints.clientFromString(
            reactor, f"sesame:remote=edge-1:host=127.0.0.1:port={port}"
                     ":hub=127.0.0.1\\:7443:token=ses_0123456789ab_secret")
    assert str(info.value) == f"port: port {port!r} is not a number in 1-65535"


def test_endpoint_port_key_takes_ascii_digits(monkeypatch):
    for var in ("SESAME_HUB", "SESAME_TOKEN", "SESAME_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    ep = endpoints.clientFromString(
        reactor, "sesame:remote=edge-1:host=127.0.0.1:port=22"
                 ":hub=127.0.0.1\\:7443:token=ses_0123456789ab_secret:tls=no")
    assert ep.address == "127.0.0.1:22"


@pytest.mark.parametrize("port", ["²", "٢٢", "２２", "0", "+22"])
def test_route_targets_refuse_non_ascii_ports(port):
    with pytest.raises(ValueError, match="is not HOST:PORT with a port 1-65535"):
        parse_target(f"127.0.0.1:{port}@edge-1")
    assert parse_target("127.0.0.1:22@edge-1").address == "127.0.0.1:22"


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "hub.db")
    yield s
    s.close()


@pytest.mark.parametrize("match", ["²", "٢٢", "２２", "٢"])
def test_tcp_routes_refuse_non_ascii_ports(store, match):
    """``sesame route add tcp PORT TARGET``: INVALID_ARGUMENT naming the match (``²`` was an
    uncaught ValueError; ``٢٢`` a route listening on port 22)."""
    with pytest.raises(InvalidArgument) as info:
        store.create_route("tcp", match, "web@edge-1")
    assert info.value.field == "match" and info.value.code == "INVALID_ARGUMENT"
    assert "ASCII" in str(info.value) and repr(match) in str(info.value)
    assert store.list_routes() == []


@pytest.mark.parametrize("match", ["tcp:٢٢", "tcp:²:interface=127.0.0.1", "tcp6:port=٢٢",
                                   "tcp:interface=127.0.0.1:port=２２"])
def test_tcp_route_descriptions_refuse_non_ascii_ports(store, match):
    with pytest.raises(InvalidArgument) as info:
        store.create_route("tcp", match, "web@edge-1")
    assert info.value.field == "match" and "is not a number in 0-65535" in str(info.value)
    assert server_description_problem(match)
    assert server_description_problem("tcp:2222:interface=127.0.0.1") is None


@pytest.mark.parametrize("port", ["²", "٢٢"])
def test_tcp_route_targets_refuse_non_ascii_ports(store, port):
    with pytest.raises(InvalidArgument) as info:
        store.create_route("tcp", "2222", f"127.0.0.1:{port}@edge-1")
    assert info.value.field == "target"


def test_tcp_routes_take_ascii_ports(store):
    route = store.create_route("tcp", "2222", "127.0.0.1:22@edge-1")
    assert (route.match, route.target) == ("2222", "127.0.0.1:22@edge-1")


def test_conn_addresses_with_non_ascii_ports_are_kept_whole():
    """What a remote reports in its ``conn`` reply is never an error, and ``٢٢`` is not 22."""
    addr = NetConnAddress.parse("via", netaddr_pb2.NetAddr(address="10.0.0.1:٢٢"))
    assert (addr.host, addr.port) == ("10.0.0.1:٢٢", 0)
    addr = NetConnAddress.parse("via", netaddr_pb2.NetAddr(address="10.0.0.1:22"))
    assert (addr.host, addr.port) == ("10.0.0.1", 22)


@pytest.mark.parametrize("match", ["²", "٢٢"])
def test_route_add_tcp_command_refuses_non_ascii_ports(tmp_path, capsys, match):
    """``sesame route add tcp PORT TARGET``: one line naming the problem, exit status 2, no
    route (``²`` was a traceback; ``٢٢`` a route on port 22)."""
    from sesame.cli import main

    data = tmp_path / "data"
    data.mkdir()
    assert main(["route", "add", "--data-dir", str(data), "tcp", match, "web@edge-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sesame route: add: ") and repr(match) in err and "ASCII" in err, err
    assert main(["route", "ls", "--data-dir", str(data), "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"
    assert main(["route", "add", "--data-dir", str(data), "tcp", "2222", "127.0.0.1:٢٢@edge-1"]) == 2
    assert "is not HOST:PORT with a port 1-65535" in capsys.readouterr().err
