"""
Front-door route targets: ``ENDPOINT@REMOTE`` or ``HOST:PORT@REMOTE``.

Pure (no Twisted, no grpc), so the store can refuse a bad target whoever
creates the route: the CLI, the management API or code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sesame import _names as N

_ENDPOINT_RESOURCE = re.compile(r"^namespaces/([^/]+)/remotes/([^/]+)/endpoints/([^/]+)$")


@dataclass(frozen=True)
class Target:
    """Where a front-door route leads: an endpoint of a remote, or an address it dials.

    Written ``ENDPOINT@REMOTE`` or ``HOST:PORT@REMOTE`` (``REMOTE`` may be a
    resource name ``namespaces/NS/remotes/R``); see :func:`parse_target`.
    """

    namespace: str
    remote: str
    endpoint: str  # "netconn" when ``address`` is set
    address: str | None = None

    def __str__(self) -> str:
        what = self.address or self.endpoint
        remote = (self.remote if self.namespace == N.DEFAULT_NAMESPACE
                  else N.resource_name(self.namespace, self.remote))
        return f"{what}@{remote}"


def parse_target(text: str) -> Target:
    """``web@edge-1``, ``127.0.0.1:8080@edge-1``, ``[::1]:22@namespaces/lab/remotes/edge-1``,
    or an endpoint's resource name ``namespaces/NS/remotes/R/endpoints/E``.

    Raises ValueError naming what is wrong.
    """
    m = _ENDPOINT_RESOURCE.match(text.strip())
    if m:
        text = f"{m.group(3)}@namespaces/{m.group(1)}/remotes/{m.group(2)}"
    what, at, remote = text.strip().rpartition("@")
    if not at or not what or not remote:
        raise ValueError(f"target {text!r}: expected ENDPOINT@REMOTE, HOST:PORT@REMOTE or "
                         "namespaces/NS/remotes/R/endpoints/E (e.g. web@edge-1 or "
                         "127.0.0.1:8080@edge-1)")
    ns, name = N.parse_remote(remote)
    if ":" in what:
        host, _, port_text = what.rpartition(":")
        host = host.strip("[]")
        try:
            port = N.parse_port(port_text)  # ASCII digits: "٢٢" is not 22
        except ValueError:
            port = 0
        if not host or not port:
            raise ValueError(f"target {text!r}: {what!r} is not HOST:PORT with a port 1-65535")
        return Target(ns, name, N.NETCONN_ENDPOINT, N.join_host_port(host, port))
    if not N.valid_name(what) or what == N.NETCONN_ENDPOINT:
        raise ValueError(f"target {text!r}: {what!r} is not a valid endpoint name")
    return Target(ns, name, what)


__all__ = ["Target", "parse_target"]
