from flora.v1 import run_pb2 as _run_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ArtifactKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARTIFACT_KIND_UNSPECIFIED: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_GLOBAL_ADAPTER: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_GLOBAL_LORA: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_MERGED_MODULES: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_GLOBAL_UPDATE: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_SECURE_INBOX: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_SECURE_SKETCH: _ClassVar[ArtifactKind]
ARTIFACT_KIND_UNSPECIFIED: ArtifactKind
ARTIFACT_KIND_GLOBAL_ADAPTER: ArtifactKind
ARTIFACT_KIND_GLOBAL_LORA: ArtifactKind
ARTIFACT_KIND_MERGED_MODULES: ArtifactKind
ARTIFACT_KIND_GLOBAL_UPDATE: ArtifactKind
ARTIFACT_KIND_SECURE_INBOX: ArtifactKind
ARTIFACT_KIND_SECURE_SKETCH: ArtifactKind

class Chunk(_message.Message):
    __slots__ = ("kind", "version", "offset", "total_bytes", "sha256", "data")
    KIND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    kind: ArtifactKind
    version: int
    offset: int
    total_bytes: int
    sha256: str
    data: bytes
    def __init__(self, kind: _Optional[_Union[ArtifactKind, str]] = ..., version: _Optional[int] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("round", "rank", "alpha", "scaling_rule", "num_examples", "total_bytes", "sha256", "base_version", "train_loss", "validation_loss", "steps", "train_seconds")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    SCALING_RULE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_LOSS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    round: int
    rank: int
    alpha: float
    scaling_rule: _run_pb2.ScalingRule
    num_examples: int
    total_bytes: int
    sha256: str
    base_version: int
    train_loss: float
    validation_loss: float
    steps: int
    train_seconds: float
    def __init__(self, round: _Optional[int] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., scaling_rule: _Optional[_Union[_run_pb2.ScalingRule, str]] = ..., num_examples: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., base_version: _Optional[int] = ..., train_loss: _Optional[float] = ..., validation_loss: _Optional[float] = ..., steps: _Optional[int] = ..., train_seconds: _Optional[float] = ...) -> None: ...

class UpdatePiece(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "piece")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PIECE_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    piece: UpdatePiece
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., piece: _Optional[_Union[UpdatePiece, _Mapping]] = ...) -> None: ...
