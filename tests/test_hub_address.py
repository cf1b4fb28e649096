"""Where a hub is dialled: ``--hub``, ``hub=`` and ``SESAME_HUB`` take ``HOST:PORT`` and
Twisted's ``tcp:`` client spelling; anything else is a one-line error naming the key and
the expected form."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sesame import _names as N
from sesame.endpoints import hub_config


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1:7443", ("127.0.0.1", 7443)),
    (" hub.example:443 ", ("hub.example", 443)),
    ("[::1]:7443", ("::1", 7443)),
    ("tcp:127.0.0.1:7443", ("127.0.0.1", 7443)),
    ("tcp:host=hub.example:port=443", ("hub.example", 443)),
    ("tcp:port=443:host=hub.example", ("hub.example", 443)),
    ("tcp6:host=\\:\\:1:port=7443", ("::1", 7443)),
    ("tcp:7443:interface=127.0.0.1", ("127.0.0.1", 7443)),  # the --listen spelling
])
def test_accepted_spellings(text: str, expected: tuple[str, int]) -> None:
    assert N.hub_address(text) == expected


@pytest.mark.parametrize("text,why", [
    ("127.0.0.1", "expected HOST:PORT, [IPV6]:PORT or tcp:HOST:PORT"),
    ("::1:7443", "expected HOST:PORT, [IPV6]:PORT or tcp:HOST:PORT"),
    ("[::1]7443", "expected HOST:PORT, [IPV6]:PORT or tcp:HOST:PORT"),
    (":7443", "no host"),
    ("127.0.0.1:0", "port '0' is not a number in 1-65535"),
    ("127.0.0.1:65536", "port '65536' is not a number in 1-65535"),
    ("127.0.0.1:²", "port '²' is not a number in 1-65535"),
    ("127.0.0.1:٢٢", "port '٢٢' is not a number in 1-65535"),
    ("tcp:127.0.0.1:7443:timeout=5", "unsupported option 'timeout'"),
    ("tcp:127.0.0.1:7443:9", "too many parts"),
    ("ssl:127.0.0.1:7443", "a hub is dialled over TCP (TLS comes from --ca / tls=)"),
    ("unix:/tmp/hub.sock", "a hub is dialled over TCP"),
])
def test_refused_spellings_say_what_is_expected(text: str, why: str) -> None:
    with pytest.raises(ValueError) as err:
        N.hub_address(text)
    assert why in str(err.value)
    assert repr(text) in str(err.value)


def test_hub_config_names_the_key_that_was_wrong(tmp_path) -> None:
    token = "ses_abcdefghijklmnop_" + "x" * 32
    cfg = hub_config({"hub": "tcp:127.0.0.1:7443", "token": token, "tls": "no"}, env={})
    assert cfg.target == "127.0.0.1:7443"
    cfg = hub_config({"token": token, "tls": "no"}, env={"SESAME_HUB": "tcp:host=\\:\\:1:port=7443"})
    assert cfg.target == "[::1]:7443"
    with pytest.raises(ValueError, match=r"^hub: 'tcp:127\.0\.0\.1': no port; expected HOST:PORT"):
        hub_config({"hub": "tcp:127.0.0.1", "token": token}, env={})
    with pytest.raises(ValueError, match=r"^SESAME_HUB: 'ssl:h:1': a hub is dialled over TCP"):
        hub_config({"token": token}, env={"SESAME_HUB": "ssl:h:1"})


def test_sesame_remote_with_a_bad_hub_is_one_line(tmp_path) -> None:
    token = tmp_path / "t"
    token.write_text("ses_abcdefghijklmnop_" + "x" * 32)
    r = subprocess.run([sys.executable, "-m", "sesame", "remote", "--hub",
                        "tcp:127.0.0.1:7443:timeout=5", "--name", "edge-1",
                        "--token-file", str(token)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "--hub" in lines[0] and "unsupported option 'timeout'" in lines[0], lines[0]


@pytest.mark.parametrize("text,expected", [
    # interface= before port= was ignored: the hub listened on every interface
    ("tcp:interface=127.0.0.1:port=7443", ("127.0.0.1", 7443)),
    ("tcp:7443:interface=127.0.0.1", ("127.0.0.1", 7443)),
    ("tcp:7443:127.0.0.1", ("127.0.0.1", 7443)),          # tcp:PORT:INTERFACE
    ("tcp6:7443:50:\\:\\:1", ("::1", 7443)),              # tcp6:PORT:BACKLOG:INTERFACE
    ("tcp6:7443:interface=\\:\\:1", ("::1", 7443)),       # escaped colons
    ("tcp:7443", ("0.0.0.0", 7443)),
    ("tcp6:7443", ("::", 7443)),
    ("127.0.0.1:0", ("127.0.0.1", 0)),
    ("[::1]:7443", ("::1", 7443)),
])
def test_listen_spellings(text: str, expected: tuple[str, int]) -> None:
    assert N.grpc_address(text) == expected


@pytest.mark.parametrize("text,why", [
    ("tcp:7443:foo=1", "unsupported option 'foo'"),
    ("tcp:port=1:2", "port given twice"),
    ("tcp:7443:port=8443:interface=127.0.0.1", "port given twice"),  # as Twisted says
    ("tcp:1:2:3:4", "too many parts"),
])
def test_listen_mistakes(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        N.grpc_address(text)
