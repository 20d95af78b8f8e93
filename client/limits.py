"""The run's limits on an update, checked by the client before it uploads.

The server refuses an update above ``RunSpec.max_rank`` or ``RunSpec.max_update_norm``
(protos/PROTOCOL.md, "SubmitUpdate"); the run spec carries both, so a client finds out locally,
with the two numbers named, instead of spending the upload to be told. The norm is the server's:
that of the update's change from the client's start, |s B A - init|_F over every target module.
Under differential privacy (``RunSpec.dp_noise_multiplier`` set) the server accepts any norm and
clips it to ``dp_clip_norm``, so the client uploads whatever it trained: holding an update back for
its size would make taking part depend on the data.
"""

from __future__ import annotations

from flora.client.local import ConfigError
from flora.common.lora import LoraAdapter
from flora.common.robust import change_norm
from flora.v1 import run_pb2


def check_update(spec: run_pb2.RunSpec, update: LoraAdapter, init: LoraAdapter | None) -> float:
    """Raise ``ConfigError`` when ``update`` breaks a limit of the run (0 in the spec: none); return its norm."""
    if spec.max_rank and update.rank > spec.max_rank:
        raise ConfigError(f"this client's rank {update.rank} exceeds the run's max_rank {spec.max_rank}: lower --rank")
    norm = change_norm(update, init)
    if spec.max_update_norm and not spec.dp_noise_multiplier and not norm <= spec.max_update_norm:
        raise ConfigError(
            f"this round's update has norm |s B A - init|_F = {norm:.6g}, above the run's max_update_norm "
            f"{spec.max_update_norm:.6g}: the server would refuse it, so it is not uploaded (lower the learning rate "
            "or the steps per round)")
    return norm
