import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import any_pb2 as _any_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from sesame.type import grpcmetadata_pb2 as _grpcmetadata_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Remote(_message.Message):
    __slots__ = ("name", "display_name", "description", "create_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    description: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., description: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("name", "display_name", "description", "create_time", "spec")
    class Spec(_message.Message):
        __slots__ = ("tunnel",)
        TUNNEL_FIELD_NUMBER: _ClassVar[int]
        tunnel: Endpoint.Tunnel
        def __init__(self, tunnel: _Optional[_Union[Endpoint.Tunnel, _Mapping]] = ...) -> None: ...
    class Tunnel(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    description: str
    create_time: _timestamp_pb2.Timestamp
    spec: Endpoint.Spec
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., description: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., spec: _Optional[_Union[Endpoint.Spec, _Mapping]] = ...) -> None: ...

class Namespace(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class CreateRemoteRequest(_message.Message):
    __slots__ = ("parent", "resource_id", "remote")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    REMOTE_FIELD_NUMBER: _ClassVar[int]
    parent: str
    resource_id: str
    remote: Remote
    def __init__(self, parent: _Optional[str] = ..., resource_id: _Optional[str] = ..., remote: _Optional[_Union[Remote, _Mapping]] = ...) -> None: ...

class GetRemoteRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteRemoteRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UpdateRemoteRequest(_message.Message):
    __slots__ = ("name", "update_mask", "remote")
    NAME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    REMOTE_FIELD_NUMBER: _ClassVar[int]
    name: str
    update_mask: _field_mask_pb2.FieldMask
    remote: Remote
    def __init__(self, name: _Optional[str] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., remote: _Optional[_Union[Remote, _Mapping]] = ...) -> None: ...

class ListRemotesRequest(_message.Message):
    __slots__ = ("parent", "page_size", "page_token")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    parent: str
    page_size: int
    page_token: str
    def __init__(self, parent: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRemotesResponse(_message.Message):
    __slots__ = ("remotes", "next_page_token")
    REMOTES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    remotes: _containers.RepeatedCompositeFieldContainer[Remote]
    next_page_token: str
    def __init__(self, remotes: _Optional[_Iterable[_Union[Remote, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CreateEndpointRequest(_message.Message):
    __slots__ = ("parent", "resource_id", "endpoint")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    parent: str
    resource_id: str
    endpoint: Endpoint
    def __init__(self, parent: _Optional[str] = ..., resource_id: _Optional[str] = ..., endpoint: _Optional[_Union[Endpoint, _Mapping]] = ...) -> None: ...

class GetEndpointRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteEndpointRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UpdateEndpointRequest(_message.Message):
    __slots__ = ("name", "update_mask", "endpoint")
    NAME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    name: str
    update_mask: _field_mask_pb2.FieldMask
    endpoint: Endpoint
    def __init__(self, name: _Optional[str] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., endpoint: _Optional[_Union[Endpoint, _Mapping]] = ...) -> None: ...

class ListEndpointsRequest(_message.Message):
    __slots__ = ("parent", "page_size", "page_token")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    parent: str
    page_size: int
    page_token: str
    def __init__(self, parent: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListEndpointsResponse(_message.Message):
    __slots__ = ("endpoints", "next_page_token")
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    next_page_token: str
    def __init__(self, endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ProxyRequest(_message.Message):
    __slots__ = ("dial", "header", "content")
    class Dial(_message.Message):
        __slots__ = ("endpoint", "method", "conn_mask")
        ENDPOINT_FIELD_NUMBER: _ClassVar[int]
        METHOD_FIELD_NUMBER: _ClassVar[int]
        CONN_MASK_FIELD_NUMBER: _ClassVar[int]
        endpoint: str
        method: str
        conn_mask: _field_mask_pb2.FieldMask
        def __init__(self, endpoint: _Optional[str] = ..., method: _Optional[str] = ..., conn_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...
    DIAL_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    dial: ProxyRequest.Dial
    header: _grpcmetadata_pb2.GrpcMetadata
    content: _any_pb2.Any
    def __init__(self, dial: _Optional[_Union[ProxyRequest.Dial, _Mapping]] = ..., header: _Optional[_Union[_grpcmetadata_pb2.GrpcMetadata, _Mapping]] = ..., content: _Optional[_Union[_any_pb2.Any, _Mapping]] = ...) -> None: ...

class ProxyResponse(_message.Message):
    __slots__ = ("conn", "error", "header", "content", "trailer")
    class Conn(_message.Message):
        __slots__ = ("namespace", "remote", "endpoint")
        NAMESPACE_FIELD_NUMBER: _ClassVar[int]
        REMOTE_FIELD_NUMBER: _ClassVar[int]
        ENDPOINT_FIELD_NUMBER: _ClassVar[int]
        namespace: Namespace
        remote: Remote
        endpoint: Endpoint
        def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., remote: _Optional[_Union[Remote, _Mapping]] = ..., endpoint: _Optional[_Union[Endpoint, _Mapping]] = ...) -> None: ...
    CONN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    conn: ProxyResponse.Conn
    error: _status_pb2.Status
    header: _grpcmetadata_pb2.GrpcMetadata
    content: _any_pb2.Any
    trailer: _grpcmetadata_pb2.GrpcMetadata
    def __init__(self, conn: _Optional[_Union[ProxyResponse.Conn, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., header: _Optional[_Union[_grpcmetadata_pb2.GrpcMetadata, _Mapping]] = ..., content: _Optional[_Union[_any_pb2.Any, _Mapping]] = ..., trailer: _Optional[_Union[_grpcmetadata_pb2.GrpcMetadata, _Mapping]] = ...) -> None: ...
