"""
``twistd sesame``: sesame services under twistd.

    twistd -n sesame host [--listen 127.0.0.1:7443]

``host`` runs a tunnel host (both dialects) serving gRPC health and
reflection on forward tunnels and accepting reverse tunnels.  It grows into
the hub; until TLS and tokens exist it listens on loopback only.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from sesame.cli import DEFAULT_LISTEN, _is_loopback, _registry


class HostOptions(usage.Options):
    synopsis = "[--listen HOST:PORT]"
    longdesc = "Run a tunnel host (sesame.type + grpctunnel.v1) on a loopback address."
    optParameters = [
        ["listen", "l", DEFAULT_LISTEN,
         f"HOST:PORT to listen on (default {DEFAULT_LISTEN}; port 0 picks one; loopback only)"],
    ]

    def postOptions(self) -> None:
        if not _is_loopback(self["listen"]):
            raise usage.UsageError(
                f"--listen {self['listen']}: only loopback addresses are allowed until "
                "TLS and tokens land"
            )


class Options(usage.Options):
    synopsis = "host [options]"
    subCommands = [["host", None, HostOptions, "Run a tunnel host."]]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("name a subcommand: host")


class TunnelHostService(service.Service):
    """Starts a :class:`sesame.tunnel.TunnelHost` with the application."""

    log = Logger()

    def __init__(self, listen: str) -> None:
        self.listen = listen
        self.host: Any = None
        self.port: int | None = None

    def startService(self) -> None:
        from sesame.tunnel import TunnelHost

        super().startService()
        self.host = TunnelHost(_registry())
        self.port = self.host.start(self.listen)
        self.log.info(
            "sesame tunnel host listening on {address}",
            address=f"{self.listen.rsplit(':', 1)[0]}:{self.port}",
        )

    def stopService(self) -> Any:
        from sesame._bridge import to_deferred

        super().stopService()
        if self.host is None:
            return None
        host, self.host = self.host, None

        async def stop() -> None:
            host._draining = True
            if host._server is not None:
                await host._server.stop(1)

        return to_deferred(host.bridge.submit(stop()))


def makeService(options: Options) -> service.IService:
    top = service.MultiService()
    if options.subCommand == "host":
        TunnelHostService(options.subOptions["listen"]).setServiceParent(top)
    return top
