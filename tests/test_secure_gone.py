"""A secure step does not wait its deadline for a client the server knows is gone (issue 30).

A client that left the run, was removed, or joined again (a new process holds none of the
attempt's secrets) answers no step of the attempt. ``SecureRounds.gone`` (called by the
coordinator's Leave, RemoveClient and Join) closes the open step as soon as every other client
asked has answered, and no later step asks it. Here the stage deadline is an hour and the whole
aggregation is bounded by two minutes: before, the step waited the hour out and the bound failed
the test; now the round ends in about a second.
"""

from __future__ import annotations

import pytest
import torch

from test_secure_wire import assert_same_adapter, method_round, secure_round, setup
from flora.common.methods import get_method
from flora.common.secagg.errors import SecAggError

HOUR, BOUND = 3600.0, 120.0
EXAMPLES = [10, 20, 30]


@pytest.mark.parametrize("step", ["share", "mask1"])
def test_a_client_gone_before_its_stage_one_upload_is_left_out_without_waiting(step):
    kept, updates = method_round("flora")
    result, decisions, output, _ = secure_round("flora", kept, updates, EXAMPLES, silent={2: step}, gone=True,
                                                deadline=HOUR, bound=BOUND)
    plain = get_method("flora").merge(kept, updates[:2], [1 / 3, 2 / 3], torch.float64)
    assert_same_adapter(result.delta, plain.delta)
    assert output.secure["survivors"] == 2 and decisions[2].rejected
    assert output.secure["dropouts_recovered"] == (1 if step == "mask1" else 0)  # a non-sharer is left out before the plan


@pytest.mark.parametrize("step", ["unmask1", "mask2"])
def test_a_client_gone_after_stage_ones_sum_fails_the_attempt_without_waiting(step):
    kept, updates = method_round("flora")
    with pytest.raises(SecAggError, match="starts over"):
        secure_round("flora", kept, updates, EXAMPLES, silent={2: step}, gone=True, deadline=HOUR, bound=BOUND)


def test_a_client_that_joins_again_before_it_advertised_is_not_counted_gone():
    """Its new process trains and advertises in the same attempt: it must still be asked."""
    secure, _, current, ids = setup("flora")
    secure.round_info(ids[0], current)  # the attempt opens
    secure.gone(ids[0])
    assert not secure._attempt.gone
