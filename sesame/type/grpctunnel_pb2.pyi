from google.protobuf import empty_pb2 as _empty_pb2
from google.rpc import status_pb2 as _status_pb2
from sesame.type import grpcmetadata_pb2 as _grpcmetadata_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClientToServer(_message.Message):
    __slots__ = ("stream_id", "window_update", "new_stream", "message", "message_data", "half_close", "cancel")
    class NewStream(_message.Message):
        __slots__ = ("method", "header")
        METHOD_FIELD_NUMBER: _ClassVar[int]
        HEADER_FIELD_NUMBER: _ClassVar[int]
        method: str
        header: _grpcmetadata_pb2.GrpcMetadata
        def __init__(self, method: _Optional[str] = ..., header: _Optional[_Union[_grpcmetadata_pb2.GrpcMetadata, _Mapping]] = ...) -> None: ...
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOW_UPDATE_FIELD_NUMBER: _ClassVar[int]
    NEW_STREAM_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_DATA_FIELD_NUMBER: _ClassVar[int]
    HALF_CLOSE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    window_update: int
    new_stream: ClientToServer.NewStream
    message: EncodedMessage
    message_data: bytes
    half_close: _empty_pb2.Empty
    cancel: _empty_pb2.Empty
    def __init__(self, stream_id: _Optional[int] = ..., window_update: _Optional[int] = ..., new_stream: _Optional[_Union[ClientToServer.NewStream, _Mapping]] = ..., message: _Optional[_Union[EncodedMessage, _Mapping]] = ..., message_data: _Optional[bytes] = ..., half_close: _Optional[_Union[_empty_pb2.Empty, _Mapping]] = ..., cancel: _Optional[_Union[_empty_pb2.Empty, _Mapping]] = ...) -> None: ...

class ServerToClient(_message.Message):
    __slots__ = ("stream_id", "window_update", "header", "message", "message_data", "close_stream")
    class CloseStream(_message.Message):
        __slots__ = ("trailer", "status")
        TRAILER_FIELD_NUMBER: _ClassVar[int]
        STATUS_FIELD_NUMBER: _ClassVar[int]
        trailer: _grpcmetadata_pb2.GrpcMetadata
        status: _status_pb2.Status
        def __init__(self, trailer: _Optional[_Union[_grpcmetadata_pb2.GrpcMetadata, _Mapping]] = ..., status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOW_UPDATE_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_DATA_FIELD_NUMBER: _ClassVar[int]
    CLOSE_STREAM_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    window_update: int
    header: _grpcmetadata_pb2.GrpcMetadata
    message: EncodedMessage
    message_data: bytes
    close_stream: ServerToClient.CloseStream
    def __init__(self, stream_id: _Optional[int] = ..., window_update: _Optional[int] = ..., header: _Optional[_Union[_grpcmetadata_pb2.GrpcMetadata, _Mapping]] = ..., message: _Optional[_Union[EncodedMessage, _Mapping]] = ..., message_data: _Optional[bytes] = ..., close_stream: _Optional[_Union[ServerToClient.CloseStream, _Mapping]] = ...) -> None: ...

class EncodedMessage(_message.Message):
    __slots__ = ("size", "data")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    size: int
    data: bytes
    def __init__(self, size: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
