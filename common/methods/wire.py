"""The wire's name of each method: ``RunSpec.method`` (protos/flora/v1/run.proto) and back.

The one table that pairs a method module with its ``AggregationMethod`` enum value, read by the
server (to describe its run) and by the client (to find the method whose ``start`` it follows).
"""

from __future__ import annotations

from flora.common.methods import AggregationMethod, get_method
from flora.v1 import run_pb2

WIRE_VALUES: dict[str, int] = {
    "flora": run_pb2.AGGREGATION_METHOD_FLORA,
    "fedit": run_pb2.AGGREGATION_METHOD_FEDIT,
    "zeropad": run_pb2.AGGREGATION_METHOD_ZEROPAD,
    "fedex": run_pb2.AGGREGATION_METHOD_FEDEX,
    "flora-warm": run_pb2.AGGREGATION_METHOD_FLORA_WARM,
    "ffa": run_pb2.AGGREGATION_METHOD_FFA,
    "flexlora": run_pb2.AGGREGATION_METHOD_FLEXLORA,
}


def to_wire(name: str) -> int:
    """``RunSpec.method`` of the method called ``name``."""
    return WIRE_VALUES[get_method(name).name]


def from_wire(value: int) -> AggregationMethod:
    """The method a ``RunSpec.method`` names, or a ValueError for a value this software does not know."""
    for name, wire in WIRE_VALUES.items():
        if wire == value:
            return get_method(name)
    raise ValueError(f"RunSpec.method {value} is not a method this client knows; upgrade flora-fl")
