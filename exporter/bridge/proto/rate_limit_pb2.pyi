import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetRateLimitPoliciesRequest(_message.Message):
    __slots__ = ("participant_ispb",)
    PARTICIPANT_ISPB_FIELD_NUMBER: _ClassVar[int]
    participant_ispb: str
    def __init__(self, participant_ispb: _Optional[str] = ...) -> None: ...

class GetRateLimitPolicyRequest(_message.Message):
    __slots__ = ("policy_name", "participant_ispb")
    POLICY_NAME_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_ISPB_FIELD_NUMBER: _ClassVar[int]
    policy_name: str
    participant_ispb: str
    def __init__(self, policy_name: _Optional[str] = ..., participant_ispb: _Optional[str] = ...) -> None: ...

class ResponseCount(_message.Message):
    __slots__ = ("code", "count")
    CODE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    code: int
    count: int
    def __init__(self, code: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class RateLimitPolicy(_message.Message):
    __slots__ = ("name", "available_tokens", "capacity", "refill_tokens", "refill_period_sec", "error_404_rate", "response_counts")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    REFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REFILL_PERIOD_SEC_FIELD_NUMBER: _ClassVar[int]
    ERROR_404_RATE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    available_tokens: int
    capacity: int
    refill_tokens: int
    refill_period_sec: int
    error_404_rate: float
    response_counts: _containers.RepeatedCompositeFieldContainer[ResponseCount]
    def __init__(self, name: _Optional[str] = ..., available_tokens: _Optional[int] = ..., capacity: _Optional[int] = ..., refill_tokens: _Optional[int] = ..., refill_period_sec: _Optional[int] = ..., error_404_rate: _Optional[float] = ..., response_counts: _Optional[_Iterable[_Union[ResponseCount, _Mapping]]] = ...) -> None: ...

class GetRateLimitPoliciesResponse(_message.Message):
    __slots__ = ("response_time", "correlation_id", "category", "policies", "participant_ispb")
    RESPONSE_TIME_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_ISPB_FIELD_NUMBER: _ClassVar[int]
    response_time: _timestamp_pb2.Timestamp
    correlation_id: str
    category: str
    policies: _containers.RepeatedCompositeFieldContainer[RateLimitPolicy]
    participant_ispb: str
    def __init__(self, response_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., correlation_id: _Optional[str] = ..., category: _Optional[str] = ..., policies: _Optional[_Iterable[_Union[RateLimitPolicy, _Mapping]]] = ..., participant_ispb: _Optional[str] = ...) -> None: ...

class GetRateLimitPolicyResponse(_message.Message):
    __slots__ = ("response_time", "correlation_id", "category", "policy", "participant_ispb")
    RESPONSE_TIME_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_ISPB_FIELD_NUMBER: _ClassVar[int]
    response_time: _timestamp_pb2.Timestamp
    correlation_id: str
    category: str
    policy: RateLimitPolicy
    participant_ispb: str
    def __init__(self, response_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., correlation_id: _Optional[str] = ..., category: _Optional[str] = ..., policy: _Optional[_Union[RateLimitPolicy, _Mapping]] = ..., participant_ispb: _Optional[str] = ...) -> None: ...
