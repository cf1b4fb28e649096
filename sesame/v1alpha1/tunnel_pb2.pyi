from google.rpc import status_pb2 as _status_pb2
from sesame.type import grpctunnel_pb2 as _grpctunnel_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TunnelRequest(_message.Message):
    __slots__ = ("id", "connect", "stream")
    class Connect(_message.Message):
        __slots__ = ("remote", "stream_buffer")
        REMOTE_FIELD_NUMBER: _ClassVar[int]
        STREAM_BUFFER_FIELD_NUMBER: _ClassVar[int]
        remote: str
        stream_buffer: int
        def __init__(self, remote: _Optional[str] = ..., stream_buffer: _Optional[int] = ...) -> None: ...
    class Stream(_message.Message):
        __slots__ = ("error",)
        ERROR_FIELD_NUMBER: _ClassVar[int]
        error: _status_pb2.Status
        def __init__(self, error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    CONNECT_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    id: int
    connect: TunnelRequest.Connect
    stream: TunnelRequest.Stream
    def __init__(self, id: _Optional[int] = ..., connect: _Optional[_Union[TunnelRequest.Connect, _Mapping]] = ..., stream: _Optional[_Union[TunnelRequest.Stream, _Mapping]] = ...) -> None: ...

class TunnelResponse(_message.Message):
    __slots__ = ("id", "connect", "stream")
    class Connect(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class Stream(_message.Message):
        __slots__ = ("endpoint",)
        ENDPOINT_FIELD_NUMBER: _ClassVar[int]
        endpoint: str
        def __init__(self, endpoint: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    CONNECT_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    id: int
    connect: TunnelResponse.Connect
    stream: TunnelResponse.Stream
    def __init__(self, id: _Optional[int] = ..., connect: _Optional[_Union[TunnelResponse.Connect, _Mapping]] = ..., stream: _Optional[_Union[TunnelResponse.Stream, _Mapping]] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("connect", "dial", "tunnel")
    class Connect(_message.Message):
        __slots__ = ("remote",)
        REMOTE_FIELD_NUMBER: _ClassVar[int]
        remote: str
        def __init__(self, remote: _Optional[str] = ...) -> None: ...
    class Dial(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    CONNECT_FIELD_NUMBER: _ClassVar[int]
    DIAL_FIELD_NUMBER: _ClassVar[int]
    TUNNEL_FIELD_NUMBER: _ClassVar[int]
    connect: StreamRequest.Connect
    dial: StreamRequest.Dial
    tunnel: _grpctunnel_pb2.ServerToClient
    def __init__(self, connect: _Optional[_Union[StreamRequest.Connect, _Mapping]] = ..., dial: _Optional[_Union[StreamRequest.Dial, _Mapping]] = ..., tunnel: _Optional[_Union[_grpctunnel_pb2.ServerToClient, _Mapping]] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("connect", "dial", "tunnel")
    class Connect(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class Dial(_message.Message):
        __slots__ = ("endpoint",)
        ENDPOINT_FIELD_NUMBER: _ClassVar[int]
        endpoint: str
        def __init__(self, endpoint: _Optional[str] = ...) -> None: ...
    CONNECT_FIELD_NUMBER: _ClassVar[int]
    DIAL_FIELD_NUMBER: _ClassVar[int]
    TUNNEL_FIELD_NUMBER: _ClassVar[int]
    connect: StreamResponse.Connect
    dial: StreamResponse.Dial
    tunnel: _grpctunnel_pb2.ClientToServer
    def __init__(self, connect: _Optional[_Union[StreamResponse.Connect, _Mapping]] = ..., dial: _Optional[_Union[StreamResponse.Dial, _Mapping]] = ..., tunnel: _Optional[_Union[_grpctunnel_pb2.ClientToServer, _Mapping]] = ...) -> None: ...
