"""A secure step does not wait its deadline for a client the server knows is gone (issue 30).

A client that left the run, was removed, or joined again (a new process holds none of the
attempt's secrets) answers no step of the attempt. ``SecureRounds.gone`` (called by the
coordinator's Leave, RemoveClient and Join) closes the open step as soon as every other client
asked has answered, and no later step asks it. Here the stage deadline is an hour and the whole
aggregation is bounded by two minutes: before, the step waited the hour out and the bound failed
the test; now the round ends in about a second.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from test_secure_wire import assert_same_adapter, method_round, secure_round, setup
from flora.common.methods import get_method
from flora.common.secagg.errors import SecAggError
from flora.server.secure_round import SecureRounds
from flora.server.secure_state import SavedAttempt

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


def test_an_upload_whose_step_closed_while_it_was_kept_leaves_no_file(monkeypatch):
    """The last client is known gone while its upload is being written, and the write ends after
    the step closed and its uploads were deleted: refused (it counts as dropped, its pairwise
    keys are recovered), and its file is deleted with the refusal instead of staying on disk
    beside the recovered keys until some later attempt cleans the folder."""
    keep, opened = SavedAttempt.save_upload, SecureRounds.round_info
    holder: dict[str, SecureRounds] = {}
    written: list[tuple[int, int]] = []

    def round_info(self, client_id, current):
        holder["secure"] = self
        return opened(self, client_id, current)

    async def save_upload(self, stage, client, vectors):
        secure = holder["secure"]
        if stage == 1 and client == 2:
            secure.gone(secure._attempt.ids[client])
            server = secure._attempt.server
            while (server.stage, server.phase) == (1, "mask") or list(secure.folder.glob("*.s1-c[01].masked")):
                await asyncio.sleep(0.01)  # the step closed, its sum saved, its uploads deleted
        await keep(self, stage, client, vectors)
        written.append((stage, client))

    monkeypatch.setattr(SecureRounds, "round_info", round_info)
    monkeypatch.setattr(SavedAttempt, "save_upload", save_upload)
    kept, updates = method_round("flora")
    result, _, output, secure = secure_round("flora", kept, updates, EXAMPLES, deadline=HOUR, bound=BOUND)
    assert_same_adapter(result.delta, get_method("flora").merge(kept, updates[:2], [1 / 3, 2 / 3], torch.float64).delta)
    assert output.secure["dropouts_recovered"] == 1
    assert (1, 2) in written and not list(secure.folder.glob("*.masked")), "a refused upload stayed on disk"
