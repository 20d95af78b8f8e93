from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AggregationMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGGREGATION_METHOD_UNSPECIFIED: _ClassVar[AggregationMethod]
    AGGREGATION_METHOD_FLORA: _ClassVar[AggregationMethod]
    AGGREGATION_METHOD_FEDIT: _ClassVar[AggregationMethod]
    AGGREGATION_METHOD_ZEROPAD: _ClassVar[AggregationMethod]
    AGGREGATION_METHOD_FEDEX: _ClassVar[AggregationMethod]
    AGGREGATION_METHOD_FLORA_WARM: _ClassVar[AggregationMethod]
    AGGREGATION_METHOD_FFA: _ClassVar[AggregationMethod]
    AGGREGATION_METHOD_FLEXLORA: _ClassVar[AggregationMethod]

class ScalingRule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCALING_RULE_UNSPECIFIED: _ClassVar[ScalingRule]
    SCALING_RULE_STANDARD: _ClassVar[ScalingRule]
    SCALING_RULE_RSLORA: _ClassVar[ScalingRule]
AGGREGATION_METHOD_UNSPECIFIED: AggregationMethod
AGGREGATION_METHOD_FLORA: AggregationMethod
AGGREGATION_METHOD_FEDIT: AggregationMethod
AGGREGATION_METHOD_ZEROPAD: AggregationMethod
AGGREGATION_METHOD_FEDEX: AggregationMethod
AGGREGATION_METHOD_FLORA_WARM: AggregationMethod
AGGREGATION_METHOD_FFA: AggregationMethod
AGGREGATION_METHOD_FLEXLORA: AggregationMethod
SCALING_RULE_UNSPECIFIED: ScalingRule
SCALING_RULE_STANDARD: ScalingRule
SCALING_RULE_RSLORA: ScalingRule

class TargetModule(_message.Message):
    __slots__ = ("name", "out_features", "in_features")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OUT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    IN_FEATURES_FIELD_NUMBER: _ClassVar[int]
    name: str
    out_features: int
    in_features: int
    def __init__(self, name: _Optional[str] = ..., out_features: _Optional[int] = ..., in_features: _Optional[int] = ...) -> None: ...

class TrainingHints(_message.Message):
    __slots__ = ("max_steps", "local_epochs", "learning_rate", "batch_size")
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    max_steps: int
    local_epochs: float
    learning_rate: float
    batch_size: int
    def __init__(self, max_steps: _Optional[int] = ..., local_epochs: _Optional[float] = ..., learning_rate: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class RunSpec(_message.Message):
    __slots__ = ("run_id", "base_model", "base_model_hash", "target_modules", "method", "rounds", "max_update_bytes", "chunk_size", "required_scaling", "hints", "global_lora_rank", "max_rank", "max_update_norm", "max_weight_share", "clip_norm", "clip_median_multiple", "reject_median_multiple", "secure_aggregation", "secure_clip_norm", "secure_stage_deadline_s", "dp_noise_multiplier", "dp_clip_norm", "dp_release")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_SCALING_FIELD_NUMBER: _ClassVar[int]
    HINTS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATE_NORM_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHT_SHARE_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    CLIP_MEDIAN_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    REJECT_MEDIAN_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    SECURE_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    SECURE_STAGE_DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    DP_NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    DP_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    DP_RELEASE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    base_model: str
    base_model_hash: str
    target_modules: _containers.RepeatedCompositeFieldContainer[TargetModule]
    method: AggregationMethod
    rounds: int
    max_update_bytes: int
    chunk_size: int
    required_scaling: float
    hints: TrainingHints
    global_lora_rank: int
    max_rank: int
    max_update_norm: float
    max_weight_share: float
    clip_norm: float
    clip_median_multiple: float
    reject_median_multiple: float
    secure_aggregation: bool
    secure_clip_norm: float
    secure_stage_deadline_s: float
    dp_noise_multiplier: float
    dp_clip_norm: float
    dp_release: str
    def __init__(self, run_id: _Optional[str] = ..., base_model: _Optional[str] = ..., base_model_hash: _Optional[str] = ..., target_modules: _Optional[_Iterable[_Union[TargetModule, _Mapping]]] = ..., method: _Optional[_Union[AggregationMethod, str]] = ..., rounds: _Optional[int] = ..., max_update_bytes: _Optional[int] = ..., chunk_size: _Optional[int] = ..., required_scaling: _Optional[float] = ..., hints: _Optional[_Union[TrainingHints, _Mapping]] = ..., global_lora_rank: _Optional[int] = ..., max_rank: _Optional[int] = ..., max_update_norm: _Optional[float] = ..., max_weight_share: _Optional[float] = ..., clip_norm: _Optional[float] = ..., clip_median_multiple: _Optional[float] = ..., reject_median_multiple: _Optional[float] = ..., secure_aggregation: _Optional[bool] = ..., secure_clip_norm: _Optional[float] = ..., secure_stage_deadline_s: _Optional[float] = ..., dp_noise_multiplier: _Optional[float] = ..., dp_clip_norm: _Optional[float] = ..., dp_release: _Optional[str] = ...) -> None: ...
