from flora.v1 import run_pb2 as _run_pb2
from flora.v1 import secagg_pb2 as _secagg_pb2
from flora.v1 import transfer_pb2 as _transfer_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClientActivity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CLIENT_ACTIVITY_UNSPECIFIED: _ClassVar[ClientActivity]
    CLIENT_ACTIVITY_IDLE: _ClassVar[ClientActivity]
    CLIENT_ACTIVITY_SYNCING: _ClassVar[ClientActivity]
    CLIENT_ACTIVITY_TRAINING: _ClassVar[ClientActivity]
    CLIENT_ACTIVITY_UPLOADING: _ClassVar[ClientActivity]
CLIENT_ACTIVITY_UNSPECIFIED: ClientActivity
CLIENT_ACTIVITY_IDLE: ClientActivity
CLIENT_ACTIVITY_SYNCING: ClientActivity
CLIENT_ACTIVITY_TRAINING: ClientActivity
CLIENT_ACTIVITY_UPLOADING: ClientActivity

class Capabilities(_message.Message):
    __slots__ = ("rank", "alpha", "scaling_rule", "device", "num_examples", "software_version")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    SCALING_RULE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    rank: int
    alpha: float
    scaling_rule: _run_pb2.ScalingRule
    device: str
    num_examples: int
    software_version: str
    def __init__(self, rank: _Optional[int] = ..., alpha: _Optional[float] = ..., scaling_rule: _Optional[_Union[_run_pb2.ScalingRule, str]] = ..., device: _Optional[str] = ..., num_examples: _Optional[int] = ..., software_version: _Optional[str] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetRunReply(_message.Message):
    __slots__ = ("run", "global_version")
    RUN_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_VERSION_FIELD_NUMBER: _ClassVar[int]
    run: _run_pb2.RunSpec
    global_version: int
    def __init__(self, run: _Optional[_Union[_run_pb2.RunSpec, _Mapping]] = ..., global_version: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("client_name", "capabilities", "base_model_hash")
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    client_name: str
    capabilities: Capabilities
    base_model_hash: str
    def __init__(self, client_name: _Optional[str] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., base_model_hash: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("client_id", "client_token", "run", "global_version")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_VERSION_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    client_token: str
    run: _run_pb2.RunSpec
    global_version: int
    def __init__(self, client_id: _Optional[str] = ..., client_token: _Optional[str] = ..., run: _Optional[_Union[_run_pb2.RunSpec, _Mapping]] = ..., global_version: _Optional[int] = ...) -> None: ...

class NextTaskRequest(_message.Message):
    __slots__ = ("local_version", "max_wait_ms")
    LOCAL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    local_version: int
    max_wait_ms: int
    def __init__(self, local_version: _Optional[int] = ..., max_wait_ms: _Optional[int] = ...) -> None: ...

class TrainTask(_message.Message):
    __slots__ = ("round", "deadline_unix_ms", "required_version", "hints", "global_lora_version", "start_from_global_lora", "secure")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_VERSION_FIELD_NUMBER: _ClassVar[int]
    HINTS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_LORA_VERSION_FIELD_NUMBER: _ClassVar[int]
    START_FROM_GLOBAL_LORA_FIELD_NUMBER: _ClassVar[int]
    SECURE_FIELD_NUMBER: _ClassVar[int]
    round: int
    deadline_unix_ms: int
    required_version: int
    hints: _run_pb2.TrainingHints
    global_lora_version: int
    start_from_global_lora: bool
    secure: _secagg_pb2.SecureRound
    def __init__(self, round: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ..., required_version: _Optional[int] = ..., hints: _Optional[_Union[_run_pb2.TrainingHints, _Mapping]] = ..., global_lora_version: _Optional[int] = ..., start_from_global_lora: _Optional[bool] = ..., secure: _Optional[_Union[_secagg_pb2.SecureRound, _Mapping]] = ...) -> None: ...

class WaitTask(_message.Message):
    __slots__ = ("retry_after_ms", "reason")
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    retry_after_ms: int
    reason: str
    def __init__(self, retry_after_ms: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class FinishedTask(_message.Message):
    __slots__ = ("final_version",)
    FINAL_VERSION_FIELD_NUMBER: _ClassVar[int]
    final_version: int
    def __init__(self, final_version: _Optional[int] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("train", "wait", "finished", "secure")
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    SECURE_FIELD_NUMBER: _ClassVar[int]
    train: TrainTask
    wait: WaitTask
    finished: FinishedTask
    secure: _secagg_pb2.SecureTask
    def __init__(self, train: _Optional[_Union[TrainTask, _Mapping]] = ..., wait: _Optional[_Union[WaitTask, _Mapping]] = ..., finished: _Optional[_Union[FinishedTask, _Mapping]] = ..., secure: _Optional[_Union[_secagg_pb2.SecureTask, _Mapping]] = ...) -> None: ...

class FetchGlobalRequest(_message.Message):
    __slots__ = ("kind", "from_version", "to_version", "offset", "allow_merged")
    KIND_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    ALLOW_MERGED_FIELD_NUMBER: _ClassVar[int]
    kind: _transfer_pb2.ArtifactKind
    from_version: int
    to_version: int
    offset: int
    allow_merged: bool
    def __init__(self, kind: _Optional[_Union[_transfer_pb2.ArtifactKind, str]] = ..., from_version: _Optional[int] = ..., to_version: _Optional[int] = ..., offset: _Optional[int] = ..., allow_merged: _Optional[bool] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("accepted", "duplicate", "round", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    duplicate: bool
    round: int
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., round: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("activity", "round", "progress")
    ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    activity: ClientActivity
    round: int
    progress: float
    def __init__(self, activity: _Optional[_Union[ClientActivity, str]] = ..., round: _Optional[int] = ..., progress: _Optional[float] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("open_round", "global_version", "round_closed")
    OPEN_ROUND_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_CLOSED_FIELD_NUMBER: _ClassVar[int]
    open_round: int
    global_version: int
    round_closed: bool
    def __init__(self, open_round: _Optional[int] = ..., global_version: _Optional[int] = ..., round_closed: _Optional[bool] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClientStatus(_message.Message):
    __slots__ = ("client_id", "client_name", "rank", "alpha", "num_examples", "state", "last_seen_unix_ms", "last_submitted_round", "bytes_submitted", "joined_unix_ms", "removed_unix_ms", "device")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_SUBMITTED_ROUND_FIELD_NUMBER: _ClassVar[int]
    BYTES_SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    JOINED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    client_name: str
    rank: int
    alpha: float
    num_examples: int
    state: str
    last_seen_unix_ms: int
    last_submitted_round: int
    bytes_submitted: int
    joined_unix_ms: int
    removed_unix_ms: int
    device: str
    def __init__(self, client_id: _Optional[str] = ..., client_name: _Optional[str] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., num_examples: _Optional[int] = ..., state: _Optional[str] = ..., last_seen_unix_ms: _Optional[int] = ..., last_submitted_round: _Optional[int] = ..., bytes_submitted: _Optional[int] = ..., joined_unix_ms: _Optional[int] = ..., removed_unix_ms: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class RoundSummary(_message.Message):
    __slots__ = ("round", "num_clients", "train_loss", "validation_loss", "bytes_in", "bytes_out", "committed_unix_ms", "dp_epsilon", "secure")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_LOSS_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    DP_EPSILON_FIELD_NUMBER: _ClassVar[int]
    SECURE_FIELD_NUMBER: _ClassVar[int]
    round: int
    num_clients: int
    train_loss: float
    validation_loss: float
    bytes_in: int
    bytes_out: int
    committed_unix_ms: int
    dp_epsilon: float
    secure: _secagg_pb2.SecureSummary
    def __init__(self, round: _Optional[int] = ..., num_clients: _Optional[int] = ..., train_loss: _Optional[float] = ..., validation_loss: _Optional[float] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., committed_unix_ms: _Optional[int] = ..., dp_epsilon: _Optional[float] = ..., secure: _Optional[_Union[_secagg_pb2.SecureSummary, _Mapping]] = ...) -> None: ...

class RoundStatus(_message.Message):
    __slots__ = ("round", "state", "selected", "submitted", "deadline_unix_ms", "quorum", "attempt", "min_clients", "available_clients", "num_selected", "num_submitted")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    MIN_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    NUM_SELECTED_FIELD_NUMBER: _ClassVar[int]
    NUM_SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    round: int
    state: str
    selected: _containers.RepeatedScalarFieldContainer[str]
    submitted: _containers.RepeatedScalarFieldContainer[str]
    deadline_unix_ms: int
    quorum: int
    attempt: int
    min_clients: int
    available_clients: int
    num_selected: int
    num_submitted: int
    def __init__(self, round: _Optional[int] = ..., state: _Optional[str] = ..., selected: _Optional[_Iterable[str]] = ..., submitted: _Optional[_Iterable[str]] = ..., deadline_unix_ms: _Optional[int] = ..., quorum: _Optional[int] = ..., attempt: _Optional[int] = ..., min_clients: _Optional[int] = ..., available_clients: _Optional[int] = ..., num_selected: _Optional[int] = ..., num_submitted: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("run", "state", "global_version", "round", "clients", "recent_rounds", "num_clients", "privacy")
    RUN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    RECENT_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    run: _run_pb2.RunSpec
    state: str
    global_version: int
    round: RoundStatus
    clients: _containers.RepeatedCompositeFieldContainer[ClientStatus]
    recent_rounds: _containers.RepeatedCompositeFieldContainer[RoundSummary]
    num_clients: int
    privacy: PrivacyStatus
    def __init__(self, run: _Optional[_Union[_run_pb2.RunSpec, _Mapping]] = ..., state: _Optional[str] = ..., global_version: _Optional[int] = ..., round: _Optional[_Union[RoundStatus, _Mapping]] = ..., clients: _Optional[_Iterable[_Union[ClientStatus, _Mapping]]] = ..., recent_rounds: _Optional[_Iterable[_Union[RoundSummary, _Mapping]]] = ..., num_clients: _Optional[int] = ..., privacy: _Optional[_Union[PrivacyStatus, _Mapping]] = ...) -> None: ...

class PrivacyStatus(_message.Message):
    __slots__ = ("epsilon", "delta", "target_epsilon", "noise_multiplier", "clip_norm", "accountant", "mechanisms_per_round", "ended")
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    TARGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_FIELD_NUMBER: _ClassVar[int]
    MECHANISMS_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    epsilon: float
    delta: float
    target_epsilon: float
    noise_multiplier: float
    clip_norm: float
    accountant: str
    mechanisms_per_round: int
    ended: str
    def __init__(self, epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., target_epsilon: _Optional[float] = ..., noise_multiplier: _Optional[float] = ..., clip_norm: _Optional[float] = ..., accountant: _Optional[str] = ..., mechanisms_per_round: _Optional[int] = ..., ended: _Optional[str] = ...) -> None: ...

class ListClientsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListClientsReply(_message.Message):
    __slots__ = ("clients",)
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    clients: _containers.RepeatedCompositeFieldContainer[ClientStatus]
    def __init__(self, clients: _Optional[_Iterable[_Union[ClientStatus, _Mapping]]] = ...) -> None: ...

class RemoveClientRequest(_message.Message):
    __slots__ = ("client_name", "reason")
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    client_name: str
    reason: str
    def __init__(self, client_name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RemoveClientReply(_message.Message):
    __slots__ = ("client_id", "already_removed", "message")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ALREADY_REMOVED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    already_removed: bool
    message: str
    def __init__(self, client_id: _Optional[str] = ..., already_removed: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class ReadmitClientRequest(_message.Message):
    __slots__ = ("client_name",)
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    client_name: str
    def __init__(self, client_name: _Optional[str] = ...) -> None: ...

class ReadmitClientReply(_message.Message):
    __slots__ = ("readmitted", "message")
    READMITTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    readmitted: bool
    message: str
    def __init__(self, readmitted: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class SettingsRequest(_message.Message):
    __slots__ = ("changes",)
    class ChangesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.ScalarMap[str, str]
    def __init__(self, changes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SettingsReply(_message.Message):
    __slots__ = ("settings", "message")
    class SettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    settings: _containers.ScalarMap[str, str]
    message: str
    def __init__(self, settings: _Optional[_Mapping[str, str]] = ..., message: _Optional[str] = ...) -> None: ...
