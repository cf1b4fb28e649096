"""
The trial flavour of :mod:`sesame.testing.hub` (the example in docs/TESTING.md).

Run with ``python -m twisted.trial tests.trial_hub_example``; pytest does not
collect this module (pytest-twisted and trial TestCases do not mix well), so
``tests/test_hub.py`` runs it in a subprocess instead.
"""

from __future__ import annotations

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import Agent, readBody

from sesame.netconn import NetConnError
from sesame.testing.hub import HubTestMixin


class Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"hello, " + request.path


class ThroughTheHub:
    """Agent's endpoint factory: every request goes through one ``sesame:`` client endpoint."""

    def __init__(self, endpoint):
        self.endpoint = endpoint

    def endpointForURI(self, uri):
        return self.endpoint


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class Reply(protocol.Protocol):
    def __init__(self):
        self.got = defer.Deferred()

    def dataReceived(self, data):
        if not self.got.called:
            self.got.callback(data)


class WebAppTests(HubTestMixin, unittest.TestCase):
    """A Twisted web app listening through a ``sesame:`` server endpoint."""

    async def test_page_through_the_hub(self):
        hub = self.sesame_hub
        # The app: twisted.web listening as endpoint "web" of remote edge-1.
        listen = endpoints.serverFromString(
            reactor, "sesame:remote=edge-1:endpoint=web:"
            + hub.endpoint_kwargs(hub.remote_token("edge-1")))
        port = await listen.listen(server.Site(Hello()))
        self.addCleanup(port.stopListening)

        # A client somewhere else: reach it through the hub.
        connect = endpoints.clientFromString(
            reactor, "sesame:remote=edge-1:endpoint=web:"
            + hub.endpoint_kwargs(hub.client_token()))
        agent = Agent.usingEndpointFactory(reactor, ThroughTheHub(connect))
        response = await agent.request(b"GET", b"http://edge-1/world")
        self.assertEqual(response.code, 200)
        self.assertEqual(await readBody(response), b"hello, /world")

    async def test_agent_forwards_and_refuses(self):
        hub = self.sesame_hub
        echo = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(Echo))
        self.addCleanup(echo.stopListening)
        port = echo.getHost().port
        await hub.start_remote("edge-1", allow=[f"127.0.0.1:{port}"])
        token = hub.client_token()

        ep = endpoints.clientFromString(
            reactor, f"sesame:remote=edge-1:host=127.0.0.1:port={port}:"
            + hub.endpoint_kwargs(token))
        p = await ep.connect(protocol.Factory.forProtocol(Reply))
        p.transport.write(b"ping")
        self.assertEqual(await p.got, b"ping")
        p.transport.loseConnection()

        denied = endpoints.clientFromString(
            reactor, "sesame:remote=edge-1:host=127.0.0.1:port=1:" + hub.endpoint_kwargs(token))
        err = await self.assertFailure(denied.connect(protocol.Factory.forProtocol(Reply)),
                                       NetConnError)
        self.assertEqual(err.code.name, "PERMISSION_DENIED")
