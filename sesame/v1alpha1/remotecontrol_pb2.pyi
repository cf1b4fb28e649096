import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from sesame.type import netaddr_pb2 as _netaddr_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NetConnRequest(_message.Message):
    __slots__ = ("dial", "bytes")
    class Dial(_message.Message):
        __slots__ = ("address", "timeout")
        ADDRESS_FIELD_NUMBER: _ClassVar[int]
        TIMEOUT_FIELD_NUMBER: _ClassVar[int]
        address: _netaddr_pb2.NetAddr
        timeout: _duration_pb2.Duration
        def __init__(self, address: _Optional[_Union[_netaddr_pb2.NetAddr, _Mapping]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
    DIAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    dial: NetConnRequest.Dial
    bytes: bytes
    def __init__(self, dial: _Optional[_Union[NetConnRequest.Dial, _Mapping]] = ..., bytes: _Optional[bytes] = ...) -> None: ...

class NetConnResponse(_message.Message):
    __slots__ = ("conn", "bytes")
    class Conn(_message.Message):
        __slots__ = ("local", "remote")
        LOCAL_FIELD_NUMBER: _ClassVar[int]
        REMOTE_FIELD_NUMBER: _ClassVar[int]
        local: _netaddr_pb2.NetAddr
        remote: _netaddr_pb2.NetAddr
        def __init__(self, local: _Optional[_Union[_netaddr_pb2.NetAddr, _Mapping]] = ..., remote: _Optional[_Union[_netaddr_pb2.NetAddr, _Mapping]] = ...) -> None: ...
    CONN_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    conn: NetConnResponse.Conn
    bytes: bytes
    def __init__(self, conn: _Optional[_Union[NetConnResponse.Conn, _Mapping]] = ..., bytes: _Optional[bytes] = ...) -> None: ...
