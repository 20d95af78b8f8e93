"""Secure aggregation's round: exact sums, dropouts, refusals, and nothing individual at the server."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pytest

from flora.common.secagg import keys, shamir
from flora.common.secagg.client import ClientRound
from flora.common.secagg.errors import SecAggError
from flora.common.secagg.inprocess import DROP_POINTS, masked_stages, masked_sum, run_round
from flora.common.secagg.messages import EncryptedShare, MaskedInput, RevealedShare, StageResult, UnmaskRequest
from flora.common.secagg.prg import MaskLabel, apply_mask
from flora.common.secagg.server import ServerRound

SEED = bytes(range(32))
IDS = (0, 1, 2, 3, 4)


def _inputs(ids: Sequence[int], n: int, seed: int = 0, high: int = 2**64) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.integers(0, high, n, dtype=np.uint64, endpoint=False) for c in ids}


def _sum(vectors: Sequence[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for v in vectors:
        total += v
    return total


class Round:
    """Drives a ServerRound and its ClientRounds stage by stage, so that tests can step in between."""

    def __init__(self, ids: Sequence[int] = IDS, threshold: int = 3, stages: int = 1) -> None:
        self.server = ServerRound(1, SEED, ids, stages, threshold)
        self.clients = {c: ClientRound(c, 1, SEED, stages, threshold) for c in ids}

    def to_masking(self) -> None:
        for c in self.clients.values():
            self.server.receive_keys(c.advertise())
        bundles = self.server.close_keys()
        for c, client in self.clients.items():
            self.server.receive_shares(client.share_keys(bundles[c]))
        self.inboxes = self.server.close_shares()
        for c, client in self.clients.items():
            client.receive_shares(self.inboxes[c])

    def open(self, stage: int, length: int) -> None:
        self.request = self.server.open_stage(stage, (length,))

    def send(self, inputs: dict[int, np.ndarray], senders: Sequence[int]) -> dict[int, MaskedInput]:
        sent = {c: self.clients[c].mask(self.request, [inputs[c]]) for c in senders}
        for message in sent.values():
            self.server.receive_masked(message)
        return sent

    def unmask(self, responders: Sequence[int]) -> StageResult:
        self.unmask_request = self.server.close_masked()
        for c in responders:
            self.server.receive_unmask(self.clients[c].unmask(self.unmask_request))
        return self.server.close_unmask()


def test_sum_is_exact_mod_2_64() -> None:
    ids = (3, 17, 40, 41, 99, 1000, 2**32 - 2)
    inputs = _inputs(ids, 5_000, seed=1)
    np.testing.assert_array_equal(masked_sum(inputs, 4, SEED), _sum(list(inputs.values())))
    shaped = {c: x.reshape(50, 100) for c, x in inputs.items()}
    assert masked_sum(shaped, 4, 12345).shape == (50, 100)


@pytest.mark.parametrize("point", DROP_POINTS)
@pytest.mark.parametrize("dropped", [(2,), (0, 3)])
def test_dropouts_of_one_and_two_of_five_are_recovered(point: str, dropped: tuple[int, ...]) -> None:
    inputs = _inputs(IDS, 3_000, seed=2)
    outcome = run_round(inputs, 3, SEED, {c: point for c in dropped})  # type: ignore[misc]
    counted = IDS if point == "mask" else tuple(c for c in IDS if c not in dropped)  # "mask": input arrived
    assert outcome.survivors == counted and not set(outcome.survivors) & set(outcome.dropped)
    np.testing.assert_array_equal(outcome.total, _sum([inputs[c] for c in counted]))


@pytest.mark.parametrize("point", DROP_POINTS)
def test_fewer_survivors_than_the_threshold_is_refused(point: str) -> None:
    with pytest.raises(SecAggError, match="below the threshold 3: the round must be retried") as err:
        masked_sum(_inputs(IDS, 10), 3, SEED, {c: point for c in (0, 1, 2)})  # type: ignore[misc]
    assert err.value.field == "survivors"


def test_a_refused_close_changes_nothing_and_the_stage_can_still_close() -> None:
    r = Round()
    r.to_masking()
    inputs = _inputs(IDS, 100)
    r.open(1, 100)
    r.send(inputs, (0, 1))
    with pytest.raises(SecAggError, match="2 masked inputs arrived"):
        r.server.close_masked()
    assert r.server.phase == "mask" and r.server.masked_from == {0, 1}
    r.send(inputs, (2,))
    result = r.unmask((0, 1, 2))
    assert result.survivors == (0, 1, 2) and result.dropped == (3, 4)
    np.testing.assert_array_equal(result.sums[0], _sum([inputs[c] for c in (0, 1, 2)]))


def test_a_late_client_cannot_make_the_server_learn_its_input() -> None:
    r = Round()
    r.to_masking()
    inputs = _inputs(IDS, 200, high=2**20)
    r.open(1, 200)
    r.send(inputs, (0, 1, 2, 3))
    late = r.clients[4].mask(r.request, [inputs[4]])
    request = r.server.close_masked()  # client 4 is dropped: its mask-key shares are asked for
    assert request.dropped == (4,)
    before = r.server.masked_sum[0].copy()
    with pytest.raises(SecAggError, match="closed: client 4 counts as dropped"):
        r.server.receive_masked(late)
    np.testing.assert_array_equal(r.server.masked_sum[0], before)
    responses = {c: r.clients[c].unmask(request) for c in (0, 1, 2, 3)}
    # a server that now also asks for client 4's self-mask share is refused by every holder
    both = UnmaskRequest(1, 1, (0, 1, 2, 3, 4), ())
    for c in (0, 1, 2, 3):
        with pytest.raises(SecAggError, match="differ from stage 1's earlier request"):
            r.clients[c].unmask(both)
        assert not {s.owner for s in responses[c].self_shares} & {s.owner for s in responses[c].key_shares}
    for response in responses.values():
        r.server.receive_unmask(response)
    np.testing.assert_array_equal(r.server.close_unmask().sums[0], _sum([inputs[c] for c in (0, 1, 2, 3)]))
    # a curious server that kept the late input and strips its pairwise masks with the recovered
    # mask key still holds a vector masked by client 4's self mask
    shares = [shamir.Share.from_bytes(s.share) for resp in responses.values() for s in resp.key_shares if s.owner == 4]
    key = keys.load_private_key(shamir.combine(shares, 3))
    stripped = late.vectors[0].copy()
    for v in (0, 1, 2, 3):
        seed = keys.mask_seed(key, r.server.adverts[v].mask_keys[0], 1, 4, v)
        apply_mask(stripped, seed, MaskLabel("pair", 1, 0), -1 if 4 < v else +1)
    assert not np.array_equal(stripped, inputs[4])
    assert 0.3 < float(np.mean(stripped >> np.uint64(63))) < 0.7  # inputs are below 2^20: top bit from the mask


def test_a_client_never_reveals_both_secrets_of_one_client() -> None:
    r = Round()
    r.to_masking()
    r.open(1, 10)
    r.send(_inputs(IDS, 10), IDS)
    for bad, reason in [
        (UnmaskRequest(1, 1, IDS, (4,)), "include survivors"),
        (UnmaskRequest(1, 1, (0, 1, 2), (4,)), "not stage 1's active clients"),
        (UnmaskRequest(1, 2, IDS, ()), "not the stage this client masked"),
        (UnmaskRequest(2, 1, IDS, ()), "round_id"),
    ]:
        with pytest.raises(SecAggError, match=reason):
            r.clients[0].unmask(bad)
    assert r.clients[0].unmask(UnmaskRequest(1, 1, IDS, ())).key_shares == ()


def test_what_the_server_holds_is_uniformly_masked() -> None:
    """Each masked input, and the server's running sum before the last one, is uncorrelated with
    the inputs; the top bit is set about half the time although every input is below 2^20."""
    n = 20_000
    r = Round()
    r.to_masking()
    inputs = _inputs(IDS, n, seed=5, high=2**20)
    inputs[0] = np.arange(n, dtype=np.uint64)  # strongly structured
    r.open(1, n)
    sent = r.send(inputs, IDS[:-1])
    held = [m.vectors[0] for m in sent.values()] + [r.server.masked_sum[0].copy()]
    sent |= r.send(inputs, IDS[-1:])
    for c, message in sent.items():
        assert message.vectors[0] is not inputs[c]
        held.append(message.vectors[0])
    for y in held:
        top = float(np.mean(y >> np.uint64(63)))
        assert 0.45 < top < 0.55  # 14 standard deviations from 0.5 at n = 20,000
        for x in inputs.values():  # |corr| of independent uniform vectors: about 1/sqrt(n) = 0.007
            assert abs(np.corrcoef(x.astype(np.float64), y.astype(np.float64))[0, 1]) < 0.1
    result = r.unmask(IDS)
    np.testing.assert_array_equal(result.sums[0], _sum(list(inputs.values())))


def test_malformed_keys_and_replays_are_refused_without_state_change() -> None:
    r = Round()
    c0, c1 = r.clients[0], r.clients[1]
    good = c0.advertise()
    for bad, reason in [
        (dataclasses.replace(good, channel_key=good.channel_key[:31]), "is 31 bytes"),
        (dataclasses.replace(good, mask_keys=(b"\x00" * 32,)), "low-order"),
        (dataclasses.replace(good, mask_keys=()), "0 sent, 1 expected"),
        (dataclasses.replace(good, round_id=0), "round_id"),
        (dataclasses.replace(good, client=9), "not a participant"),
    ]:
        with pytest.raises(SecAggError, match=reason):
            r.server.receive_keys(bad)
        assert r.server.adverts == {}
    r.server.receive_keys(good)
    with pytest.raises(SecAggError, match="already advertised"):
        r.server.receive_keys(good)
    for c in (c1, r.clients[2], r.clients[3], r.clients[4]):
        r.server.receive_keys(c.advertise())
    bundles = r.server.close_keys()
    shares = c0.share_keys(bundles[0])
    wrong_receiver = dataclasses.replace(shares, shares=shares.shares[:-1] + (dataclasses.replace(shares.shares[-1], receiver=0),))
    for bad, reason in [
        (wrong_receiver, "not one per neighbour"),
        (dataclasses.replace(shares, shares=shares.shares[:-1]), "not one per neighbour"),
        (dataclasses.replace(shares, shares=(dataclasses.replace(shares.shares[0], ciphertext=b"x"),) + shares.shares[1:]), "ciphertext"),
        (dataclasses.replace(shares, shares=(dataclasses.replace(shares.shares[0], sender=1),) + shares.shares[1:]), "claims sender 1"),
    ]:
        with pytest.raises(SecAggError, match=reason):
            r.server.receive_shares(bad)
        assert r.server.sealed == {}
    r.server.receive_shares(shares)
    with pytest.raises(SecAggError, match="already sent its shares"):
        r.server.receive_shares(shares)
    with pytest.raises(SecAggError, match="already sent"):
        c0.share_keys(bundles[0])


def _shared_round() -> tuple[Round, dict[int, tuple[EncryptedShare, ...]]]:
    r = Round()
    for c in r.clients.values():
        r.server.receive_keys(c.advertise())
    bundles = r.server.close_keys()
    for c, client in r.clients.items():
        r.server.receive_shares(client.share_keys(bundles[c]))
    return r, r.server.close_shares()


def test_shares_for_another_receiver_or_from_an_impostor_are_refused() -> None:
    r, inboxes = _shared_round()
    to_0 = list(inboxes[0])
    from_1 = next(s for s in to_0 if s.sender == 1)
    from_2 = next(s for s in to_0 if s.sender == 2)
    for bad, reason in [
        ([next(s for s in inboxes[1] if s.sender == 2)] + to_0[1:], "receiver: 1 is not this client"),
        ([dataclasses.replace(from_2, sender=1)] + [s for s in to_0 if s.sender not in (1, 2)], "does not authenticate as from client 1"),
        ([dataclasses.replace(from_1, ciphertext=bytes(len(from_1.ciphertext)))] + [s for s in to_0 if s.sender != 1], "does not authenticate"),
        (to_0 + [from_1], "arrived twice"),
        ([dataclasses.replace(from_1, round_id=2)], "round_id"),
    ]:
        with pytest.raises(SecAggError, match=reason):
            r.clients[0].receive_shares(bad)
    r.clients[0].receive_shares(to_0)  # nothing was kept from the refused inboxes
    with pytest.raises(SecAggError, match="received once"):
        r.clients[0].receive_shares(to_0)


def test_malformed_reveals_and_duplicate_inputs_are_refused_without_state_change() -> None:
    r = Round()
    r.to_masking()
    inputs = _inputs(IDS, 50)
    r.open(1, 50)
    sent = r.send(inputs, IDS[:4])
    before = r.server.masked_sum[0].copy()
    for bad, reason in [
        (sent[0], "arrived twice"),
        (dataclasses.replace(sent[0], stage=2), "not the current stage"),
        (dataclasses.replace(sent[0], round_id=0), "round_id"),
        (MaskedInput(4, 1, 1, (np.zeros(49, np.uint64),)), "vector 0 must be 50 uint64"),
        (MaskedInput(4, 1, 1, (np.zeros(50, np.float64),)), "vector 0 must be 50 uint64"),
        (MaskedInput(7, 1, 1, (np.zeros(50, np.uint64),)), "not expected to send a masked input"),
    ]:
        with pytest.raises(SecAggError, match=reason):
            r.server.receive_masked(bad)
        np.testing.assert_array_equal(r.server.masked_sum[0], before)
    request = r.server.close_masked()
    reveal = r.clients[1].unmask(request)
    short = RevealedShare(reveal.self_shares[0].owner, reveal.self_shares[0].share[:-1])
    for bad, reason in [
        (dataclasses.replace(reveal, self_shares=(short,) + reveal.self_shares[1:]), "is 69 bytes"),
        (dataclasses.replace(reveal, self_shares=reveal.self_shares + (reveal.key_shares[0],)), "not asked for"),
        (dataclasses.replace(reveal, key_shares=reveal.key_shares + (reveal.self_shares[0],)), "not asked for"),
        (dataclasses.replace(reveal, sender=2), "not at its index 3"),
        (dataclasses.replace(reveal, sender=4), "not expected to send reveals"),
    ]:
        with pytest.raises(SecAggError, match=reason):
            r.server.receive_unmask(bad)
        assert r.server.reveals == {}
    r.server.receive_unmask(reveal)
    with pytest.raises(SecAggError, match="arrived twice"):
        r.server.receive_unmask(reveal)
    for c in (0, 2, 3):
        r.server.receive_unmask(r.clients[c].unmask(request))
    np.testing.assert_array_equal(r.server.close_unmask().sums[0], _sum([inputs[c] for c in IDS[:4]]))


def test_two_stages_with_a_dropout_between_them() -> None:
    r = Round(stages=2)
    r.to_masking()
    first, second = _inputs(IDS, 400, seed=7), _inputs(IDS, 300, seed=8)
    r.open(1, 400)
    r.send(first, IDS)
    np.testing.assert_array_equal(r.unmask(IDS).sums[0], _sum(list(first.values())))
    r.open(2, 300)
    assert r.request.active == IDS
    r.send(second, (0, 1, 2, 3))  # client 4 survived stage 1 and drops now
    result = r.unmask((0, 1, 2, 3))
    assert result.dropped == (4,)
    np.testing.assert_array_equal(result.sums[0], _sum([second[c] for c in (0, 1, 2, 3)]))
    # stage 2 recovered client 4's stage-2 mask key, which is not its stage-1 key: stage 1 stays masked
    adverts = r.server.adverts[4]
    assert adverts.mask_keys[0] != adverts.mask_keys[1]


def test_a_mask_replayed_into_another_stage_does_not_unmask() -> None:
    r = Round(stages=2)
    r.to_masking()
    first, second = _inputs(IDS, 256, seed=9, high=2**20), _inputs(IDS, 256, seed=10, high=2**20)
    r.open(1, 256)
    sent = r.send(first, IDS)
    r.unmask(IDS)
    r.open(2, 256)
    with pytest.raises(SecAggError, match="not the current stage"):
        r.server.receive_masked(sent[0])
    r.server.receive_masked(dataclasses.replace(sent[0], stage=2))  # relabelled: indistinguishable on arrival
    r.send(second, (1, 2, 3, 4))
    total = r.unmask((1, 2, 3, 4)).sums[0]  # client 0 never masked stage 2: it has nothing to reveal
    others = _sum([second[c] for c in (1, 2, 3, 4)])
    leaked = total - others  # what client 0 would have contributed: its stage-1 input, if masks were reused
    assert not np.array_equal(leaked, first[0])
    # still uniformly masked: the top bit of 256 random words; 0.3..0.7 is 6.4 standard deviations
    # (0.4..0.6, 3.2 of them, failed about once in 700 runs, the keys being fresh each run)
    assert 0.3 < float(np.mean(leaked >> np.uint64(63))) < 0.7


def test_a_client_refuses_stage_requests_out_of_order() -> None:
    r = Round(stages=2)
    r.to_masking()
    r.open(1, 4)
    with pytest.raises(SecAggError, match="not the next stage"):
        r.clients[0].mask(dataclasses.replace(r.request, stage=2), [np.zeros(4, np.uint64)])
    with pytest.raises(SecAggError, match="below the threshold"):
        r.clients[0].mask(dataclasses.replace(r.request, active=(0, 1)), [np.zeros(4, np.uint64)])
    with pytest.raises(SecAggError, match="vector 0 must be uint64"):
        r.clients[0].mask(r.request, [np.zeros(4, np.int64)])
    r.send({c: np.zeros(4, np.uint64) for c in IDS}, IDS[:4])
    r.unmask((0, 1, 2))  # 4 was reported dropped (its mask key recovered); 3 did not reveal
    with pytest.raises(SecAggError, match="not within the previous stage's survivors"):
        r.clients[0].mask(dataclasses.replace(r.request, stage=2, active=IDS), [np.zeros(4, np.uint64)])
    assert r.server.open_stage(2, (4,)).active == (0, 1, 2)


@pytest.mark.parametrize("make, reason", [
    (lambda: ServerRound(1, SEED, IDS, 1, 1), "threshold: 1 is outside 2..5"),
    (lambda: ServerRound(1, SEED, IDS, 1, 6), "threshold: 6 is outside 2..5"),
    (lambda: ServerRound(1, SEED[:31], IDS, 1, 3), "round_seed: is 31 bytes"),
    (lambda: ServerRound(-1, SEED, IDS, 1, 3), "round_id"),
    (lambda: ServerRound(1, SEED, IDS, 9, 3), "stages: 9 is outside 1..8"),
    (lambda: ServerRound(1, SEED, (0, 2**32), 1, 2), "participants"),
    (lambda: ClientRound(0, 2**64, SEED, 1, 3), "round_id"),
    (lambda: ClientRound(-1, 1, SEED, 1, 3), "client"),
    (lambda: masked_sum({0: np.zeros(3, np.uint64), 1: np.zeros(4, np.uint64)}, 2, SEED), "inputs"),
    (lambda: masked_sum({0: np.zeros(3), 1: np.zeros(3)}, 2, SEED), "inputs"),
    (lambda: masked_sum(_inputs(IDS, 3), 3, SEED, {7: "mask"}), "drop_after"),
])
def test_round_parameters_are_checked_up_front(make, reason: str) -> None:
    with pytest.raises(SecAggError, match=reason):
        make()


def test_a_threshold_the_graph_does_not_allow_is_refused_when_advertising_closes() -> None:
    r = Round(ids=range(20), threshold=3)  # k = 14 at n = 20: t must exceed 7.5
    for c in r.clients.values():
        r.server.receive_keys(c.advertise())
    with pytest.raises(SecAggError, match="threshold: 3 must exceed half of the 15 holders"):
        r.server.close_keys()
    assert r.server.phase == "advertise"


def test_masked_stages_feed_each_stage_the_previous_sum() -> None:
    """The two-pass shape: stage 2's inputs depend on stage 1's unmasked sum; both sums are exact."""
    first = _inputs(IDS, 64, seed=11)

    def vectors(stage: int, client: int, previous: StageResult | None) -> list[np.ndarray]:
        if stage == 1:
            return [first[client], first[client][:8].copy()]
        assert previous is not None and previous.stage == 1
        return [previous.sums[0] * np.uint64(client + 1)]

    one, two = masked_stages(IDS, 3, SEED, 2, vectors)
    total = _sum(list(first.values()))
    np.testing.assert_array_equal(one.sums[0], total)
    np.testing.assert_array_equal(one.sums[1], total[:8])
    np.testing.assert_array_equal(two.sums[0], total * np.uint64(sum(c + 1 for c in IDS)))
