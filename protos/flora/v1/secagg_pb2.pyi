from flora.v1 import transfer_pb2 as _transfer_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SecureRound(_message.Message):
    __slots__ = ("client_index", "participants", "round_seed", "threshold", "degree", "stages")
    CLIENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    ROUND_SEED_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DEGREE_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    client_index: int
    participants: int
    round_seed: bytes
    threshold: int
    degree: int
    stages: int
    def __init__(self, client_index: _Optional[int] = ..., participants: _Optional[int] = ..., round_seed: _Optional[bytes] = ..., threshold: _Optional[int] = ..., degree: _Optional[int] = ..., stages: _Optional[int] = ...) -> None: ...

class PublicKeys(_message.Message):
    __slots__ = ("client", "channel_key", "mask_keys")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_KEYS_FIELD_NUMBER: _ClassVar[int]
    client: int
    channel_key: bytes
    mask_keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, client: _Optional[int] = ..., channel_key: _Optional[bytes] = ..., mask_keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class AdvertiseKeysRequest(_message.Message):
    __slots__ = ("claims", "keys")
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    claims: _transfer_pb2.UpdateHeader
    keys: PublicKeys
    def __init__(self, claims: _Optional[_Union[_transfer_pb2.UpdateHeader, _Mapping]] = ..., keys: _Optional[_Union[PublicKeys, _Mapping]] = ...) -> None: ...

class SecurePlan(_message.Message):
    __slots__ = ("clients", "ranks", "scalings", "weights", "clip_norm", "sketch_seed", "kept_version", "fixed_point_bits")
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    SCALINGS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    SKETCH_SEED_FIELD_NUMBER: _ClassVar[int]
    KEPT_VERSION_FIELD_NUMBER: _ClassVar[int]
    FIXED_POINT_BITS_FIELD_NUMBER: _ClassVar[int]
    clients: _containers.RepeatedScalarFieldContainer[int]
    ranks: _containers.RepeatedScalarFieldContainer[int]
    scalings: _containers.RepeatedScalarFieldContainer[float]
    weights: _containers.RepeatedScalarFieldContainer[float]
    clip_norm: float
    sketch_seed: int
    kept_version: int
    fixed_point_bits: int
    def __init__(self, clients: _Optional[_Iterable[int]] = ..., ranks: _Optional[_Iterable[int]] = ..., scalings: _Optional[_Iterable[float]] = ..., weights: _Optional[_Iterable[float]] = ..., clip_norm: _Optional[float] = ..., sketch_seed: _Optional[int] = ..., kept_version: _Optional[int] = ..., fixed_point_bits: _Optional[int] = ...) -> None: ...

class SealedShare(_message.Message):
    __slots__ = ("sender", "receiver", "ciphertext")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    sender: int
    receiver: int
    ciphertext: bytes
    def __init__(self, sender: _Optional[int] = ..., receiver: _Optional[int] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class ShareStep(_message.Message):
    __slots__ = ("participants", "neighbours")
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    participants: _containers.RepeatedScalarFieldContainer[int]
    neighbours: _containers.RepeatedCompositeFieldContainer[PublicKeys]
    def __init__(self, participants: _Optional[_Iterable[int]] = ..., neighbours: _Optional[_Iterable[_Union[PublicKeys, _Mapping]]] = ...) -> None: ...

class MaskStep(_message.Message):
    __slots__ = ("stage", "active", "lengths", "plan", "inbox", "sketch")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    INBOX_FIELD_NUMBER: _ClassVar[int]
    SKETCH_FIELD_NUMBER: _ClassVar[int]
    stage: int
    active: _containers.RepeatedScalarFieldContainer[int]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    plan: SecurePlan
    inbox: StepDownload
    sketch: StepDownload
    def __init__(self, stage: _Optional[int] = ..., active: _Optional[_Iterable[int]] = ..., lengths: _Optional[_Iterable[int]] = ..., plan: _Optional[_Union[SecurePlan, _Mapping]] = ..., inbox: _Optional[_Union[StepDownload, _Mapping]] = ..., sketch: _Optional[_Union[StepDownload, _Mapping]] = ...) -> None: ...

class StepDownload(_message.Message):
    __slots__ = ("kind", "total_bytes", "sha256")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    kind: _transfer_pb2.ArtifactKind
    total_bytes: int
    sha256: str
    def __init__(self, kind: _Optional[_Union[_transfer_pb2.ArtifactKind, str]] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class FetchSecureRequest(_message.Message):
    __slots__ = ("round", "stage", "kind", "offset")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    round: int
    stage: int
    kind: _transfer_pb2.ArtifactKind
    offset: int
    def __init__(self, round: _Optional[int] = ..., stage: _Optional[int] = ..., kind: _Optional[_Union[_transfer_pb2.ArtifactKind, str]] = ..., offset: _Optional[int] = ...) -> None: ...

class UnmaskStep(_message.Message):
    __slots__ = ("stage", "survivors", "dropped")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    stage: int
    survivors: _containers.RepeatedScalarFieldContainer[int]
    dropped: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, stage: _Optional[int] = ..., survivors: _Optional[_Iterable[int]] = ..., dropped: _Optional[_Iterable[int]] = ...) -> None: ...

class SecureTask(_message.Message):
    __slots__ = ("round", "deadline_unix_ms", "share", "mask", "unmask")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    UNMASK_FIELD_NUMBER: _ClassVar[int]
    round: int
    deadline_unix_ms: int
    share: ShareStep
    mask: MaskStep
    unmask: UnmaskStep
    def __init__(self, round: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ..., share: _Optional[_Union[ShareStep, _Mapping]] = ..., mask: _Optional[_Union[MaskStep, _Mapping]] = ..., unmask: _Optional[_Union[UnmaskStep, _Mapping]] = ...) -> None: ...

class ShareKeysRequest(_message.Message):
    __slots__ = ("round", "shares")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    round: int
    shares: _containers.RepeatedCompositeFieldContainer[SealedShare]
    def __init__(self, round: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[SealedShare, _Mapping]]] = ...) -> None: ...

class MaskedHeader(_message.Message):
    __slots__ = ("round", "stage", "lengths", "total_bytes", "sha256")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    round: int
    stage: int
    lengths: _containers.RepeatedScalarFieldContainer[int]
    total_bytes: int
    sha256: str
    def __init__(self, round: _Optional[int] = ..., stage: _Optional[int] = ..., lengths: _Optional[_Iterable[int]] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class MaskedChunk(_message.Message):
    __slots__ = ("header", "piece")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PIECE_FIELD_NUMBER: _ClassVar[int]
    header: MaskedHeader
    piece: _transfer_pb2.UpdatePiece
    def __init__(self, header: _Optional[_Union[MaskedHeader, _Mapping]] = ..., piece: _Optional[_Union[_transfer_pb2.UpdatePiece, _Mapping]] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("owner", "share")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    owner: int
    share: bytes
    def __init__(self, owner: _Optional[int] = ..., share: _Optional[bytes] = ...) -> None: ...

class UnmaskRequest(_message.Message):
    __slots__ = ("round", "stage", "self_shares", "key_shares")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SELF_SHARES_FIELD_NUMBER: _ClassVar[int]
    KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    round: int
    stage: int
    self_shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    key_shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    def __init__(self, round: _Optional[int] = ..., stage: _Optional[int] = ..., self_shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ..., key_shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ...) -> None: ...

class SecureReply(_message.Message):
    __slots__ = ("accepted", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class SecureSummary(_message.Message):
    __slots__ = ("survivors", "dropouts_recovered", "bytes_up", "bytes_down", "seconds")
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPOUTS_RECOVERED_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    survivors: int
    dropouts_recovered: int
    bytes_up: int
    bytes_down: int
    seconds: float
    def __init__(self, survivors: _Optional[int] = ..., dropouts_recovered: _Optional[int] = ..., bytes_up: _Optional[int] = ..., bytes_down: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...
