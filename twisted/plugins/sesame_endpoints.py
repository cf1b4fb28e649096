# The sesame: endpoint parsers.  Keep this module light: every
# clientFromString / serverFromString call imports it; the real work is
# imported only when a sesame: string is parsed.
from twisted.internet.interfaces import (
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class SesameClientParser:
    """sesame:remote=edge-1:host=127.0.0.1:port=22 / sesame:remote=edge-1:endpoint=web"""

    prefix = "sesame"

    def parseStreamClient(self, reactor, *args, **kwargs):
        from sesame._grpcio import choose_grpc_io

        choose_grpc_io()  # before sesame.endpoints imports grpc (SESAME_GRPC_IO)
        from sesame.endpoints import client_from_kwargs

        if args:
            raise ValueError(f"sesame: positional arguments {args!r} are not understood; "
                             "use key=value (remote=, host=, port=, endpoint=)")
        return client_from_kwargs(reactor, kwargs)


@implementer(IPlugin, IStreamServerEndpointStringParser)
class SesameServerParser:
    """sesame:remote=edge-1:endpoint=web"""

    prefix = "sesame"

    def parseStreamServer(self, reactor, *args, **kwargs):
        from sesame._grpcio import choose_grpc_io

        choose_grpc_io()  # before sesame.endpoints imports grpc (SESAME_GRPC_IO)
        from sesame.endpoints import server_from_kwargs

        if args:
            raise ValueError(f"sesame: positional arguments {args!r} are not understood; "
                             "use key=value (remote=, endpoint=)")
        return server_from_kwargs(reactor, kwargs)


sesameClient = SesameClientParser()
sesameServer = SesameServerParser()
