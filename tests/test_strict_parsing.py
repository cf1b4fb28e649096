"""
Numbers typed by users or sent by peers are ASCII, everywhere (the rest of issue 10, defect 8;
``tests/test_ports.py`` has the ports of dial targets, ``--allow``, ``port=`` and routes).

``int`` and ``str.isdigit`` take ``²``, ``٢٢`` (Arabic-Indic) or ``２２`` (fullwidth), ``int``
signs, spaces and ``_``, and ``float`` also ``nan``, ``inf`` and ``1e3``.  Here: ``--listen``,
bare front-door ports (``--vhost 8000``), the ``grpc-timeout`` header, the tunnel window /
chunk metadata and the ``timeout=`` key of ``sesame:`` client endpoints; and
docs/NETCONN.md lists the statuses a NetConn call ends with.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from twisted.internet import endpoints, reactor
from twisted.python import usage

from sesame import _names as N
from sesame.core import parse_timeout
from sesame.tunnel._served import split_timeout
from sesame.tunnel._service import EXT_CHUNK_KEY, EXT_WINDOW_KEY, PeerExt, ext_parse

ROOT = Path(__file__).resolve().parent.parent

#: Digits of other scripts, and what ``int`` takes besides digits.
NOT_ASCII_DIGITS = ("٢٢", "２２", "²", "٢", "߂߂", "+22", "-22", "2_2")


# --- --listen (sesame._names.grpc_address) ---------------------------------------------


@pytest.mark.parametrize("port", NOT_ASCII_DIGITS)
@pytest.mark.parametrize("form", ["127.0.0.1:{}", "[::1]:{}", "tcp:{}:interface=127.0.0.1",
                                  "tcp6:{}", "tcp:interface=127.0.0.1:port={}"])
def test_listen_refuses_ports_that_are_not_ascii_digits(form, port):
    """``127.0.0.1:٢٢`` listened on port 22; ``127.0.0.1:²`` was int()'s own error."""
    listen = form.format(port)
    with pytest.raises(ValueError) as info:
        N.grpc_address(listen)
    assert str(info.value) == f"listen {listen!r}: port {port!r} is not a number in 0-65535"


@pytest.mark.parametrize("listen, address", [
    ("127.0.0.1:7443", ("127.0.0.1", 7443)),
    ("127.0.0.1:0", ("127.0.0.1", 0)),
    ("[::1]:65535", ("::1", 65535)),
    ("tcp:7443:interface=127.0.0.1", ("127.0.0.1", 7443)),
    ("tcp6:07443", ("::", 7443)),
    (" tcp:7443 ", ("0.0.0.0", 7443)),
])
def test_listen_takes_ascii_ports(listen, address):
    assert N.grpc_address(listen) == address


@pytest.mark.parametrize("listen, port", [("127.0.0.1:65536", "65536"), ("127.0.0.1:", ""),
                                          ("tcp:port", "port")])
def test_listen_out_of_range_keeps_its_message(listen, port):
    with pytest.raises(ValueError) as info:
        N.grpc_address(listen)
    assert str(info.value) == f"listen {listen!r}: port {port!r} is not a number in 0-65535"


def test_hub_listen_option_refuses_non_ascii_port():
    from sesame.tap import HubOptions

    with pytest.raises(usage.UsageError) as info:
        HubOptions().parseOptions(["--listen", "127.0.0.1:٢٢"])
    assert str(info.value) == ("--listen: listen '127.0.0.1:٢٢': port '٢٢' "
                               "is not a number in 0-65535")


# --- bare front-door ports (sesame._routecli.check_hub_options) ------------------------


@pytest.mark.parametrize("option", ["--vhost", "--sni", "--grpc-door"])
@pytest.mark.parametrize("port", ["٢٢", "８０８０", "²", "٢"])
def test_bare_front_door_ports_are_ascii_digits(option, port):
    """``--vhost ٢٢`` was taken as a port and rewritten to ``tcp:٢٢:interface=...`` before
    being refused: the error names the option and the value as typed."""
    from sesame.tap import HubOptions

    with pytest.raises(usage.UsageError) as info:
        HubOptions().parseOptions([option, port])
    assert str(info.value) == f"{option}: port {port!r} is not a number in 0-65535"


def test_bare_front_door_port_takes_ascii_digits():
    from sesame.tap import HubOptions

    o = HubOptions()
    o.parseOptions(["--sni", "08443", "--front-interface", "127.0.0.2"])
    assert o["sni"] == "tcp:8443:interface=127.0.0.2"


# --- grpc-timeout (sesame.core.parse_timeout) -----------------------------------------


@pytest.mark.parametrize("value", [
    "٢S", "２S", "²S", "1٢m", "٢٢٢u", "߂n",  # digits of other scripts
    "+1S", "-1S", " 1S", "1 S", "1_0S", "1S\n", "\n1S",  # what int() takes besides
    "", "S", "1", "1s", "1h", "1.5S", "1e3S", "123456789S", "0x1S",  # malformed as ever
])
def test_grpc_timeout_is_ascii_digits_and_a_unit(value):
    assert parse_timeout(value) is None


@pytest.mark.parametrize("value, seconds", [
    ("1S", 1.0), ("2H", 7200.0), ("3M", 180.0), ("250m", 0.25), ("5u", 5e-6), ("7n", 7e-9),
    ("99999999S", 99999999.0), ("00000001S", 1.0), ("0m", 0.0),
])
def test_grpc_timeout_takes_the_spec_form(value, seconds):
    assert parse_timeout(value) == pytest.approx(seconds)


def test_a_non_ascii_grpc_timeout_sets_no_deadline():
    """A served call whose ``grpc-timeout`` is ``٢S`` has no deadline (it had one of 2 s),
    as for any malformed value; the entry is still taken out of the metadata."""
    for earliest in (True, False):
        deadline, md = split_timeout((("grpc-timeout", "٢S"), ("k", "v")), earliest=earliest)
        assert deadline is None and md == (("k", "v"),)


# --- tunnel window / chunk metadata (sesame.tunnel._service.ext_parse) -----------------


def _ext(window: object, chunk: object) -> tuple[tuple[str, object], ...]:
    return ((EXT_WINDOW_KEY, window), (EXT_CHUNK_KEY, chunk))


@pytest.mark.parametrize("window, chunk", [
    ("٦٥٥٣٥", "1024"), ("65535", "١٠٢٤"), ("６５５３５", "1024"),
    ("+65535", "1024"), ("65535", " 1024"), ("65_535", "1024"), ("65535", "1024\n"),
    ("65535", ""), ("0x10000", "1024"), ("4194304", "2" + "0" * 4000),
    (None, "1024"), ("65535", None),
])
def test_tunnel_metadata_numbers_are_ascii_digits(window, chunk):
    """``int`` read ``٦٥٥٣٥`` as 65535 (and raised TypeError on a non-text value): any of
    these means the protocol's fixed sizes, as a missing key does."""
    assert ext_parse(_ext(window, chunk)) is None


def test_tunnel_metadata_ascii_digits_in_range():
    assert ext_parse(_ext("4194304", "262144")) == PeerExt(4194304, 262144, batch=False)
    assert ext_parse(_ext("65535", "1024")) == PeerExt(65535, 1024, batch=False)
    assert ext_parse(_ext("0000065535", "1024")) == PeerExt(65535, 1024, batch=False)
    # batches only for exactly "1", and only with valid sizes
    assert ext_parse((*_ext("65535", "1024"), ("sesame-tunnel-batch", "1"))).batch is True
    for no in ("0", "yes", " 1", "١"):
        assert ext_parse((*_ext("65535", "1024"), ("sesame-tunnel-batch", no))).batch is False
    assert ext_parse((*_ext("65534", "1024"), ("sesame-tunnel-batch", "1"))) is None
    assert ext_parse(_ext("65534", "1024")) is None  # out of range, as before
    assert ext_parse(((EXT_WINDOW_KEY, "65535"),)) is None
    assert ext_parse(()) is None


# --- timeout= of sesame: client endpoints (sesame.endpoints) ---------------------------


def _client(monkeypatch, timeout: str):
    for var in ("SESAME_HUB", "SESAME_TOKEN", "SESAME_TOKEN_FILE", "SESAME_CA", "SESAME_TLS"):
        monkeypatch.delenv(var, raising=False)
    return endpoints.clientFromString(
        reactor, "sesame:remote=edge-1:host=127.0.0.1:port=22:hub=127.0.0.1\\:7443"
                 f":token=ses_0123456789ab_secret:tls=no:timeout={timeout}")


@pytest.mark.parametrize("timeout", [
    "nan", "NaN", "inf", "-inf", "Infinity", "1e3", "1E-1", "٢", "２", "1_0", " 5", "5 ",
    "+5", "0x10", "", ".", "-", "5s", "1" * 400,
])
def test_endpoint_timeout_refuses_what_is_not_ascii_decimal(monkeypatch, timeout):
    """``float`` took ``nan`` (a dial that never times out), ``inf``, ``٢``, ``1_0``..."""
    with pytest.raises(ValueError) as info:
        _client(monkeypatch, timeout)
    message = str(info.value)
    assert message.startswith("timeout: ") and message.endswith(" is not a number of seconds")
    if len(timeout) <= 20:
        assert message == f"timeout: {timeout!r} is not a number of seconds"


@pytest.mark.parametrize("timeout", ["0", "0.0", "-1", "-0.5", "00"])
def test_endpoint_timeout_must_be_positive(monkeypatch, timeout):
    with pytest.raises(ValueError) as info:
        _client(monkeypatch, timeout)
    assert str(info.value) == "timeout: must be positive"


@pytest.mark.parametrize("timeout, seconds", [("5", 5.0), ("2.5", 2.5), (".5", 0.5),
                                              ("5.", 5.0), ("0.001", 0.001), ("030", 30.0)])
def test_endpoint_timeout_takes_ascii_decimal(monkeypatch, timeout, seconds):
    assert _client(monkeypatch, timeout).timeout == seconds


# --- docs/NETCONN.md: how a NetConn call can end ----------------------------------------


def _netconn_errors_section() -> str:
    text = (ROOT / "docs" / "NETCONN.md").read_text()
    return text.split("Dial errors arrive as", 1)[1].split("\n## ", 1)[0]


def test_netconn_doc_names_every_status_the_remote_ends_a_call_with():
    """Every status code the remote's NetConn modules end a call with is in the list (OK is
    success; CANCELLED only answers a call its client cancelled)."""
    section = _netconn_errors_section()
    codes: set[str] = set()
    for name in ("_dialer.py", "_servicer.py", "_relay.py"):
        source = (ROOT / "sesame" / "netconn" / name).read_text()
        codes |= set(re.findall(r"Status\(([A-Z_]+)\b", source))
        codes |= set(re.findall(r"grpc\.StatusCode\.([A-Z_]+)", source))
    assert {"INVALID_ARGUMENT", "INTERNAL", "PERMISSION_DENIED", "UNAVAILABLE",
            "DEADLINE_EXCEEDED"} <= codes
    for code in sorted(codes - {"OK", "CANCELLED"}):
        assert f"`{code}`" in section, code


def test_netconn_doc_lists_the_invalid_argument_and_internal_cases():
    section = " ".join(_netconn_errors_section().split())  # one line: wrapping ignored
    invalid = section.split("`INVALID_ARGUMENT`", 1)[1].split("- `UNAVAILABLE`", 1)[0]
    assert "does not parse as a `NetConnRequest`" in invalid
    assert "closes (aborts) the target connection" in invalid
    assert "IDNA cannot encode" in invalid
    assert "not ASCII digits 1-65535" in invalid
    internal = section.split("`INTERNAL`", 1)[1]
    assert "unexpected error in the dial path" in internal and "logs it" in internal
