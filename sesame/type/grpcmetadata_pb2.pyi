from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GrpcMetadata(_message.Message):
    __slots__ = ("data",)
    class DataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: GrpcMetadata.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[GrpcMetadata.Value, _Mapping]] = ...) -> None: ...
    class Value(_message.Message):
        __slots__ = ("str", "bin")
        STR_FIELD_NUMBER: _ClassVar[int]
        BIN_FIELD_NUMBER: _ClassVar[int]
        str: GrpcMetadata.Str
        bin: GrpcMetadata.Bin
        def __init__(self, str: _Optional[_Union[GrpcMetadata.Str, _Mapping]] = ..., bin: _Optional[_Union[GrpcMetadata.Bin, _Mapping]] = ...) -> None: ...
    class Str(_message.Message):
        __slots__ = ("values",)
        VALUES_FIELD_NUMBER: _ClassVar[int]
        values: _containers.RepeatedScalarFieldContainer[str]
        def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...
    class Bin(_message.Message):
        __slots__ = ("values",)
        VALUES_FIELD_NUMBER: _ClassVar[int]
        values: _containers.RepeatedScalarFieldContainer[bytes]
        def __init__(self, values: _Optional[_Iterable[bytes]] = ...) -> None: ...
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: _containers.MessageMap[str, GrpcMetadata.Value]
    def __init__(self, data: _Optional[_Mapping[str, GrpcMetadata.Value]] = ...) -> None: ...
