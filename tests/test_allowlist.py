"""Dial allowlists: parsing, matching, default deny, precise errors."""

import pytest

from sesame.netconn._allowlist import (
    AddressError,
    Allowlist,
    PatternError,
    host_name,
    split_host_port,
)


def test_empty_denies_everything():
    a = Allowlist()
    assert not a
    assert not a.allows_ip("127.0.0.1", 80)
    assert not a.allows_name("localhost", 80)


@pytest.mark.parametrize(
    "pattern, ok, denied",
    [
        ("127.0.0.1:*", [("127.0.0.1", 1), ("127.0.0.1", 65535)], [("127.0.0.2", 80)]),
        ("10.0.0.0/8:22", [("10.1.2.3", 22)], [("10.1.2.3", 23), ("11.0.0.1", 22)]),
        ("[::1]:8000-8100", [("::1", 8000), ("::1", 8100)], [("::1", 7999), ("::1", 8101),
                                                           ("127.0.0.1", 8000)]),
        ("*:443", [("1.2.3.4", 443), ("::1", 443)], [("1.2.3.4", 80)]),
        ("*", [("8.8.8.8", 53), ("::", 1)], []),
        ("[fd00::]/8:22", [("fd12::1", 22)], [("fe80::1", 22)]),
        ("127.0.0.0/8:*", [("::ffff:127.0.0.5", 80)], [("::1", 80)]),
    ],
)
def test_ip_rules(pattern, ok, denied):
    a = Allowlist([pattern])
    for ip, port in ok:
        assert a.allows_ip(ip, port), (pattern, ip, port)
    for ip, port in denied:
        assert not a.allows_ip(ip, port), (pattern, ip, port)


def test_name_rules():
    a = Allowlist(["db.internal:5432", "*.lab.example:22"])
    assert a.allows_name("db.internal", 5432)
    assert a.allows_name("DB.Internal.", 5432)
    assert not a.allows_name("db.internal", 5433)
    assert not a.allows_name("evil-db.internal", 5432)
    assert a.allows_name("box1.lab.example", 22)
    assert a.allows_name("a.b.lab.example", 22)
    assert not a.allows_name("lab.example", 22)
    assert not a.allows_name("xlab.example", 22)
    # names never satisfy address rules and vice versa
    assert not Allowlist(["10.0.0.0/8:*"]).allows_name("10.0.0.1.nip.io", 80)
    assert not a.allows_ip("10.0.0.1", 5432)


@pytest.mark.parametrize(
    "bad, words",
    [
        ("127.0.0.1", "expected HOST:PORTS"),
        ("host:0", "port '0'"),
        ("host:70000", "port '70000'"),
        ("host:9-3", "backwards"),
        ("host:http", "port 'http'"),
        ("::1:22", "expected HOST:PORTS"),
        ("bad_host!:22", "neither an address"),
        ("*.-bad:22", "wildcard"),
        ("10.0.0.0/33:22", "neither an address"),
    ],
)
def test_bad_patterns_name_themselves(bad, words):
    with pytest.raises(PatternError) as err:
        Allowlist([bad])
    assert repr(bad) in str(err.value)
    assert words in str(err.value)


@pytest.mark.parametrize(
    "address, expected",
    [("127.0.0.1:22", ("127.0.0.1", "22")), ("[::1]:8080", ("::1", "8080")),
     ("db.internal:5432", ("db.internal", "5432"))],
)
def test_split_host_port(address, expected):
    assert split_host_port(address) == expected


@pytest.mark.parametrize("address", ["nohost", ":22", "::1:22", "[::1]22", "[::1"])
def test_split_host_port_rejects(address):
    with pytest.raises(AddressError):
        split_host_port(address)


def test_unicode_patterns_are_matched_in_their_idna_form():
    """Patterns and dialled names meet in the IDNA (A-label) form: a Unicode pattern allows
    the A-labels of its names, and an A-label pattern the Unicode spelling (once encoded)."""
    a = Allowlist(["*.bücher.example:80", "straße.example:443"])
    assert a.rules[0].suffix == ".xn--bcher-kva.example"
    assert a.rules[1].name == "xn--strae-oqa.example"
    assert a.allows_name(host_name("x.Bücher.example"), 80)
    assert a.allows_name("x.xn--bcher-kva.example", 80)
    assert a.allows_name(host_name("STRASSE.example"), 443) is False  # IDNA 2008: ß is not ss
    assert a.allows_name(host_name("straße.example"), 443)
    assert not a.allows_name(host_name("x.bucher.example"), 80)


@pytest.mark.parametrize("name, ascii_form", [
    ("localhost", "localhost"), ("Box1.Lab.Example", "box1.lab.example"),
    ("x.bücher.example", "x.xn--bcher-kva.example"), ("ＬＡＢ.example", "lab.example"),
    ("a.lab.example.", "a.lab.example."), ("1.2.3", "1.2.3"),
])
def test_host_name_gives_the_ascii_form(name, ascii_form):
    assert host_name(name) == ascii_form


@pytest.mark.parametrize("name, words", [
    ("x" * 64 + ".lab.example", "too long"), ("a..lab.example", "empty"),
    ("é" * 70 + ".lab.example", "too long"), ("a b", "not allowed"), ("a\x00b", "not allowed"),
    ("-a.example", "hyphen"), ("", "empty"), ("a" * 2000, "too long"),
    (".".join(["a" * 63] * 4) + ".example", "too long"),
])
def test_host_name_refuses_what_idna_cannot_encode(name, words):
    with pytest.raises(AddressError) as err:
        host_name(name)
    assert str(err.value).startswith("host name ") and words in str(err.value).lower()


def test_unencodable_unicode_pattern_names_itself():
    bad = "*." + "é" * 60 + ".example:80"  # 60 characters, but 64+ as an A-label
    with pytest.raises(PatternError) as err:
        Allowlist([bad])
    assert repr(bad) in str(err.value) and "too long" in str(err.value).lower()
