"""Aggregation methods behind one interface (``AggregationMethod``), one module per method.

Server, client and ``flora-sim`` look a method up here by name and ask it how a client starts a
round, what the server merges and what it keeps; none of them branches on the method's name.
"""

from __future__ import annotations

from flora.common.methods.base import AggregationMethod, ClientStart, RoundResult, negated, round_error
from flora.common.methods.fedex import FedEx
from flora.common.methods.fedit import FedIt
from flora.common.methods.ffa import Ffa
from flora.common.methods.flexlora import FlexLora
from flora.common.methods.flora import Flora
from flora.common.methods.flora_warm import FloraWarm
from flora.common.methods.zeropad import ZeroPad

METHODS: dict[str, AggregationMethod] = {m.name: m for m in (Flora(), FloraWarm(), FedEx(), Ffa(), FedIt(), ZeroPad(), FlexLora())}


def get_method(name: str) -> AggregationMethod:
    """The method called ``name``, or a ValueError listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown aggregation method {name!r}; known: {', '.join(METHODS)}") from None


__all__ = ["METHODS", "AggregationMethod", "ClientStart", "RoundResult", "get_method", "negated", "round_error"]
