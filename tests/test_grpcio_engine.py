"""
The grpc I/O engine sesame's processes choose (sesame._grpcio): the older "iomgr"
engine by default, grpcio's EventEngine on request, the user's own GRPC_EXPERIMENTS
always respected, and a clear refusal for a value that is neither.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from sesame import _grpcio

FLAGS = "-event_engine_client,-event_engine_listener"


def _without_choice() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GRPC_EXPERIMENTS", _grpcio.ENV)}
    env["GRPC_VERBOSITY"] = "debug"
    env["GRPC_TRACE"] = "tcp"  # names the source file of each TCP event: which engine ran
    return env


def _engine_files(stderr: str) -> set[str]:
    return set(re.findall(r"\b(tcp_posix|posix_endpoint)\.cc", stderr))


@pytest.mark.parametrize("given, expected", [
    ({}, FLAGS),
    ({"GRPC_EXPERIMENTS": "some_other_experiment"}, f"some_other_experiment,{FLAGS}"),
    ({"GRPC_EXPERIMENTS": "event_engine_client_channel_resolver"},
     f"event_engine_client_channel_resolver,{FLAGS}"),
    ({"GRPC_EXPERIMENTS": "  "}, FLAGS),
    ({_grpcio.ENV: "IOMGR"}, FLAGS),
    ({_grpcio.ENV: ""}, FLAGS),
])
def test_iomgr_is_asked_for_by_default(given, expected):
    env = dict(given)
    assert _grpcio.choose_grpc_io(env, version=(1, 85)) == "iomgr"
    assert env["GRPC_EXPERIMENTS"] == expected


@pytest.mark.parametrize("given, answer", [
    ({_grpcio.ENV: "event-engine"}, "event-engine"),
    ({"GRPC_EXPERIMENTS": "event_engine_client"}, "as GRPC_EXPERIMENTS says"),
    ({"GRPC_EXPERIMENTS": "-event_engine_listener"}, "as GRPC_EXPERIMENTS says"),
])
def test_an_explicit_choice_is_left_alone(given, answer):
    env = dict(given)
    assert _grpcio.choose_grpc_io(env, version=(1, 85)) == answer
    assert env == given


@pytest.mark.parametrize("version", [(1, 79), (1, 86), (2, 0)])
def test_an_unmeasured_grpcio_keeps_its_default(version):
    """Outside the measured releases the experiments may be gone (grpcio logs an error
    for an unknown one), so nothing is set."""
    env: dict[str, str] = {}
    answer = _grpcio.choose_grpc_io(env, version=version)
    assert answer == f"grpcio's default: grpcio {version[0]}.{version[1]} not measured"
    assert env == {}


def test_a_bad_value_is_refused_by_name():
    with pytest.raises(ValueError, match=r"SESAME_GRPC_IO='epoll': use iomgr or event-engine"):
        _grpcio.choose_grpc_io({_grpcio.ENV: "epoll"}, version=(1, 85))


def test_this_test_process_runs_on_the_default_engine():
    """tests/__init__.py chose before any test module imported grpc, so the in-process
    tests run on what the sesame command runs on."""
    if os.environ.get(_grpcio.ENV, "").strip().lower() == "event-engine":
        pytest.skip("the suite was asked to run on the EventEngine")
    assert _grpcio.choose_grpc_io() in ("iomgr", "as GRPC_EXPERIMENTS says")
    assert "event_engine_client" in os.environ["GRPC_EXPERIMENTS"]


@pytest.mark.parametrize("choice, files", [
    (None, {"tcp_posix"}),
    ("event-engine", {"posix_endpoint"}),
])
def test_the_sesame_command_runs_on_the_chosen_engine(choice, files):
    """A real ``sesame demo`` (a tunnelled call each way over real sockets): grpc's own
    trace shows which engine carried the bytes."""
    env = _without_choice()
    if choice is not None:
        env[_grpcio.ENV] = choice
    r = subprocess.run([sys.executable, "-m", "sesame", "demo"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "SERVING" in r.stdout
    assert _engine_files(r.stderr) == files, r.stderr[-2000:]


def test_the_sesame_command_refuses_a_bad_choice():
    env = _without_choice()
    env[_grpcio.ENV] = "fast"
    r = subprocess.run([sys.executable, "-m", "sesame", "demo"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "sesame: SESAME_GRPC_IO='fast': use iomgr or event-engine"


PARSE = """
import os, sys
from twisted.internet import endpoints, reactor
try:
    endpoints.{fn}(reactor, "sesame:remote=edge-1:endpoint=web:nosuchoption=1")
except ValueError as exc:
    print("refused:", exc)
print("GRPC_EXPERIMENTS=" + os.environ.get("GRPC_EXPERIMENTS", ""))
"""


@pytest.mark.parametrize("fn", ["serverFromString", "clientFromString"])
def test_a_sesame_endpoint_string_chooses_before_grpc_is_imported(fn):
    """``twistd web --listen sesame:...`` and friends: the plugin parser chooses before
    sesame.endpoints imports grpc (and a bad option is still refused by name)."""
    env = {k: v for k, v in _without_choice().items() if not k.startswith("GRPC_")}
    r = subprocess.run([sys.executable, "-c", PARSE.format(fn=fn)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "refused:" in r.stdout and "nosuchoption" in r.stdout, r.stdout
    assert f"GRPC_EXPERIMENTS={FLAGS}" in r.stdout.splitlines()
