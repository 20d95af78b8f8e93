"""The round state machine: opening, selection, quorum, deadline, abandonment, submissions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flora.server.errors import AlreadyExists, FailedPrecondition
from flora.server.rounds import (
    Abandoned,
    Closed,
    DuplicatePayload,
    Finished,
    Opened,
    Round,
    RoundMachine,
    RoundPolicy,
    RoundState,
    Selection,
    Short,
    Train,
    Wait,
)

SHA_A, SHA_B = "a" * 64, "b" * 64


def policy(**overrides) -> RoundPolicy:
    values = {"rounds": 3, "min_clients": 2, "selection": Selection("all"), "quorum": 0.5, "deadline_s": 100.0,
              "client_timeout_s": 30.0, "seed": 7}
    values.update(overrides)
    return RoundPolicy(**values)


def machine_with(clients: list[str], now: float = 0.0, **overrides) -> RoundMachine:
    machine = RoundMachine(policy(**overrides))
    for client in clients:
        machine.joined(client, now)
    return machine


def test_selection_forms_and_sizes():
    assert Selection.parse("all").size(5) == 5
    assert Selection.parse(" 3 ").size(5) == 3
    assert Selection.parse("3").size(2) == 2
    assert Selection.parse("0.5").size(5) == 3
    assert Selection.parse("0.01").size(5) == 1
    assert Selection.parse("1.0").size(4) == 4
    for bad in ("none", "0", "1.5", "-2", "", 3):
        with pytest.raises(ValueError, match="clients_per_round"):
            Selection.parse(bad)


def test_quorum_ignores_float_noise():
    assert policy(quorum=0.7).quorum_count(10) == 7
    assert policy(quorum=0.01).quorum_count(3) == 1
    assert policy(quorum=1.0).quorum_count(4) == 4


def test_round_opens_only_with_min_clients_connected():
    machine = machine_with(["a"])
    assert machine.advance(1.0) == []
    assert isinstance(machine.task_for("a", 1.0), Wait)
    machine.joined("b", 2.0)
    (opened,) = machine.advance(2.0)
    assert isinstance(opened, Opened)
    assert opened.round.selected == {"a", "b"} and opened.round.deadline == 102.0 and opened.round.quorum == 1
    assert machine.task_for("a", 3.0) == Train(1, 102.0, 0)


def test_selection_is_seeded_by_seed_round_and_attempt():
    clients = [f"c{i}" for i in range(10)]
    picks = []
    for seed in (1, 1, 2):
        machine = machine_with(clients, selection=Selection("count", 3), seed=seed)
        (opened,) = machine.advance(0.0)
        picks.append(opened.round.selected)
    assert len(picks[0]) == 3 and picks[0] == picks[1] and picks[0] != picks[2]


def test_round_closes_when_every_selected_client_submitted():
    machine = machine_with(["a", "b"])
    machine.advance(0.0)
    assert machine.check_submission("a", 1, SHA_A, 0, 1.0) is True
    assert machine.accept("a", 1, SHA_A, 1.0) == []
    assert machine.check_submission("b", 1, SHA_B, 0, 2.0) is True
    (closed,) = machine.accept("b", 1, SHA_B, 2.0)
    assert closed == Closed(1, 1, ("a", "b"), "every selected client has submitted")
    assert machine.current.state is RoundState.AGGREGATING
    assert isinstance(machine.task_for("a", 3.0), Wait)


def test_deadline_with_quorum_closes_the_round():
    machine = machine_with(["a", "b", "c"])
    machine.advance(0.0)
    machine.accept("a", 1, SHA_A, 1.0)
    machine.accept("b", 1, SHA_B, 1.0)
    assert machine.advance(99.0) == []
    (closed,) = machine.advance(100.0)
    assert closed.participants == ("a", "b") and "deadline" in closed.reason


def test_deadline_without_quorum_abandons_and_reselects_keeping_accepted():
    machine = machine_with(["a", "b", "c", "d"], quorum=1.0)
    machine.advance(0.0)
    machine.accept("a", 1, SHA_A, 1.0)
    for client in ("a", "c", "d"):
        machine.seen(client, 90.0)  # b went silent at time 0
    events = machine.advance(100.0)
    assert [type(e) for e in events] == [Abandoned, Opened]
    assert events[0] == Abandoned(1, 1, accepted=1, quorum=4)
    reopened = events[1].round
    assert (reopened.number, reopened.attempt) == (1, 2)
    assert reopened.selected == {"a", "c", "d"} and reopened.accepted == {"a": SHA_A}
    assert reopened.deadline == 200.0
    assert isinstance(machine.task_for("a", 101.0), Wait)  # its update still counts
    assert machine.task_for("c", 101.0) == Train(1, 200.0, 0)


def test_a_client_that_changes_its_lora_leaves_the_open_attempt_and_takes_part_from_the_next():
    machine = machine_with(["a", "b"])
    machine.advance(0.0)
    assert machine.withdraw("a")  # rejoined with another rank while selected
    assert isinstance(machine.task_for("a", 1.0), Wait) and machine.current.selected == {"b"}
    with pytest.raises(FailedPrecondition, match="not selected"):
        machine.check_submission("a", 1, SHA_A, 0, 1.0)  # made before the change: refused
    machine.accept("b", 1, SHA_B, 2.0)
    assert machine.current.state is RoundState.AGGREGATING  # nobody else to wait for
    machine.aggregated(1)
    (opened,) = machine.advance(3.0)
    assert opened.round.selected == {"a", "b"} and machine.task_for("a", 4.0) == Train(2, 103.0, 1)


def test_a_lone_selected_client_that_changes_its_lora_reopens_the_round_with_it():
    machine = machine_with(["a", "b"], selection=Selection("count", 1))
    (opened,) = machine.advance(0.0)
    (chosen,) = opened.round.selected
    assert machine.withdraw(chosen)
    abandoned, reopened = machine.advance(1.0)  # at once, not at the deadline; never closed empty
    assert isinstance(abandoned, Abandoned) and isinstance(reopened, Opened) and reopened.round.attempt == 2


def test_a_change_after_the_update_was_accepted_keeps_the_update():
    machine = machine_with(["a", "b", "c"])
    machine.advance(0.0)
    machine.accept("a", 1, SHA_A, 1.0)
    assert not machine.withdraw("a") and machine.current.accepted == {"a": SHA_A}
    assert not machine.withdraw("z")  # not selected: nothing to do


def test_round_closes_early_when_every_missing_client_has_left():
    machine = machine_with(["a", "b", "c"])  # quorum 0.5 of 3 -> 2
    machine.advance(0.0)
    machine.accept("a", 1, SHA_A, 1.0)
    machine.accept("b", 1, SHA_B, 1.0)
    machine.left("c")
    (closed,) = machine.advance(2.0)  # long before the deadline at 100
    assert closed.participants == ("a", "b") and "stayed" in closed.reason


def test_round_abandons_early_when_the_clients_that_left_take_the_quorum_with_them():
    machine = machine_with(["a", "b", "c", "d"], quorum=1.0)
    machine.advance(0.0)
    machine.accept("a", 1, SHA_A, 1.0)
    machine.left("b")
    assert machine.advance(2.0) == []  # c and d may still submit
    machine.left("c")
    machine.left("d")
    (abandoned,) = machine.advance(3.0)
    assert abandoned == Abandoned(1, 1, accepted=1, quorum=4)


def test_abandoned_round_waits_for_enough_clients():
    machine = machine_with(["a", "b"], quorum=1.0, min_clients=2)
    machine.advance(0.0)
    events = machine.advance(100.0)  # nobody submitted, both silent since 0 (timeout 30)
    assert events == [Abandoned(1, 1, accepted=0, quorum=2)]
    assert machine.current.state is RoundState.ABANDONED
    machine.seen("a", 150.0)
    machine.seen("b", 150.0)
    (opened,) = machine.advance(150.0)
    assert opened.round.attempt == 2


def test_accepted_clients_alone_can_complete_a_reopened_round():
    machine = machine_with(["a", "b"], quorum=1.0, min_clients=1)
    machine.advance(0.0)
    machine.accept("a", 1, SHA_A, 1.0)
    machine.left("b")
    events = machine.advance(100.0)
    assert [type(e) for e in events] == [Abandoned, Opened, Closed]
    assert events[-1].participants == ("a",)


def test_late_unselected_wrong_round_and_stale_submissions_are_refused():
    machine = machine_with(["a", "b", "c"], selection=Selection("count", 2), seed=3)
    (opened,) = machine.advance(0.0)
    outsider = ({"a", "b", "c"} - opened.round.selected).pop()
    insider = sorted(opened.round.selected)[0]
    with pytest.raises(FailedPrecondition, match="not selected"):
        machine.check_submission(outsider, 1, SHA_A, 0, 1.0)
    with pytest.raises(FailedPrecondition, match="round 2 is not open"):
        machine.check_submission(insider, 2, SHA_A, 0, 1.0)
    with pytest.raises(FailedPrecondition, match="requires version 0"):
        machine.check_submission(insider, 1, SHA_A, 5, 1.0)
    with pytest.raises(FailedPrecondition, match="deadline"):
        machine.check_submission(insider, 1, SHA_A, 0, 100.0)


def test_duplicate_and_conflicting_submissions():
    machine = machine_with(["a", "b"])
    machine.advance(0.0)
    machine.accept("a", 1, SHA_A, 1.0)
    assert machine.check_submission("a", 1, SHA_A, 0, 2.0) is False
    with pytest.raises(AlreadyExists):
        machine.check_submission("a", 1, SHA_B, 0, 2.0)
    machine.accept("b", 1, SHA_B, 2.0)  # closes the round
    assert machine.check_submission("a", 1, SHA_A, 0, 3.0) is False  # retry during aggregation
    with pytest.raises(FailedPrecondition, match="aggregating"):
        machine.check_submission("c", 1, SHA_A, 0, 3.0)


def test_aggregated_rounds_advance_the_version_until_finished():
    machine = machine_with(["a", "b"], rounds=2)
    for number in (1, 2):
        machine.advance(float(number))
        machine.accept("a", number, SHA_A, float(number))
        machine.accept("b", number, SHA_B, float(number))
        machine.aggregated(number)
        assert machine.version == number
    assert machine.finished and machine.current is None
    assert machine.task_for("a", 3.0) == Finished(2)
    assert machine.advance(3.0) == []
    with pytest.raises(FailedPrecondition, match="current round: none"):
        machine.check_submission("a", 2, SHA_A, 1, 3.0)


def test_connected_means_recent_or_in_a_call_and_not_left():
    machine = machine_with(["a", "b", "c"])
    machine.call_started("b", 0.0)  # a long-poll that is still open
    machine.left("c")
    assert machine.connected(10.0) == ["a", "b"]
    assert machine.connected(31.0) == ["b"]
    machine.call_ended("b", 31.0)
    assert machine.connected(62.0) == []
    assert "left" in machine.task_for("c", 0.0).reason
    machine.joined("c", 63.0)
    assert machine.connected(63.0) == ["c"]


def test_a_restored_open_round_resumes_as_stored():
    current = Round(2, attempt=1, state=RoundState.OPEN, selected=frozenset({"a", "b"}), deadline=500.0, quorum=2,
                    accepted={"a": SHA_A})
    machine = RoundMachine(policy(), version=1, current=current)
    machine.known("a")
    machine.known("b")
    assert machine.task_for("b", 400.0) == Train(2, 500.0, 1)
    (closed,) = machine.accept("b", 2, SHA_B, 401.0)
    assert closed.participants == ("a", "b")


def test_a_restored_round_whose_updates_are_all_in_closes_at_once():
    current = Round(1, attempt=1, state=RoundState.OPEN, selected=frozenset({"a"}), deadline=500.0, quorum=1,
                    accepted={"a": SHA_A})  # the crash came between recording the update and closing
    machine = RoundMachine(policy(), version=0, current=current)
    assert machine.advance(10.0) == [Closed(1, 1, ("a",), "every selected client has submitted")]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from(["seen", "submit", "leave", "join"]), st.integers(0, 60)),
                max_size=40))
def test_invariants_hold_for_any_sequence(steps):
    machine = machine_with(["a", "b"], quorum=0.5, selection=Selection("fraction", 0.5), rounds=50)
    now = 0.0
    for client, action, delay in steps:
        now += delay
        machine.advance(now)
        if action == "seen":
            machine.seen(client, now)
        elif action == "leave":
            machine.left(client)
        elif action == "join":
            machine.joined(client, now)
        elif isinstance(task := machine.task_for(client, now), Train):
            sha = client * 64
            assert machine.check_submission(client, task.number, sha, task.required_version, now)
            if any(isinstance(e, Closed) for e in machine.accept(client, task.number, sha, now)):
                machine.aggregated(task.number)
        current = machine.current
        if current is not None and current.state is RoundState.OPEN:
            assert set(current.accepted) <= current.selected
            assert 1 <= current.quorum <= len(current.selected)
            assert current.number == machine.version + 1


def test_excluding_every_update_abandons_the_round_and_it_reopens():
    policy = RoundPolicy(rounds=2, min_clients=2, selection=Selection("all"), quorum=1.0, deadline_s=60,
                         client_timeout_s=30, seed=0)
    machine = RoundMachine(policy)
    for client in ("a", "b"):
        machine.joined(client, 0.0)
    machine.advance(0.0)
    machine.accept("a", 1, "1" * 64, 1.0)
    machine.accept("b", 1, "2" * 64, 1.0)
    assert machine.current.state is RoundState.AGGREGATING
    assert machine.exclude(1, ["a"]) is True and set(machine.current.accepted) == {"b"}
    assert machine.exclude(1, ["b"]) is False
    assert machine.current.state is RoundState.ABANDONED and not machine.current.accepted
    events = machine.advance(2.0)
    assert isinstance(events[0], Opened) and events[0].round.attempt == 2 and machine.current.number == 1


def test_waiting_counts_connected_clients_and_restored_accepted_updates():
    machine = machine_with(["a", "b"], min_clients=4)
    machine.known("c")  # restored, never called: not connected
    machine.restore_accepted([("d", SHA_A)])  # an accepted update of a client not in memory yet
    assert machine.advance(1.0) == []
    assert machine.task_for("a", 1.0) == Wait("waiting for clients to open round 1: needs 4 connected clients, has 3")
    machine.joined("e", 2.0)
    (opened,) = machine.advance(2.0)
    assert opened.round.selected == {"a", "b", "d", "e"}


def test_the_round_closes_at_the_last_selected_submission_and_not_before():
    clients = [f"c{i}" for i in range(5)]
    machine = machine_with(clients, min_clients=5)
    machine.advance(0.0)
    machine.restore_accepted([("gone", SHA_B)])  # more accepted entries than selected, one not selected
    for client in clients[:-1]:
        assert machine.accept(client, 1, SHA_A, 1.0) == []
    (closed,) = machine.accept(clients[-1], 1, SHA_A, 1.0)
    assert isinstance(closed, Closed) and closed.reason == "every selected client has submitted"


def test_the_available_count_of_a_wait_reason_is_at_most_a_second_old():
    machine = machine_with(["a"], min_clients=3)
    assert machine.task_for("a", 0.0).reason.endswith("needs 3 connected clients, has 1")
    machine.joined("b", 0.5)
    assert machine.task_for("a", 0.5).reason.endswith("needs 3 connected clients, has 1")  # counted at 0.0 still
    assert machine.task_for("a", 1.0).reason.endswith("needs 3 connected clients, has 2")


def test_a_round_short_of_clients_is_reported_once_per_change_and_a_new_policy_applies_at_once():
    machine = machine_with(["a", "b"], min_clients=3)
    assert machine.advance(0.0) == []
    assert machine.shortfall(0.0) == Short(1, needed=3, has=2)
    assert machine.shortfall(0.5) is None  # the same news is not told twice
    assert Short(1, 3, 2).text == "needs 3 connected clients, has 2"
    machine.set_policy(policy(min_clients=2))
    (opened,) = machine.advance(1.0)
    assert isinstance(opened, Opened) and opened.round.selected == {"a", "b"}
    assert machine.shortfall(1.0) is None  # open: nothing is short
    with pytest.raises(FailedPrecondition, match="rounds must be at least 1"):
        machine.set_policy(policy(rounds=0))


def test_a_finished_run_keeps_its_policy():
    machine = machine_with(["a"], min_clients=1, rounds=1)
    machine.advance(0.0)
    machine.accept("a", 1, SHA_A, 0.0)
    machine.aggregated(1)
    with pytest.raises(FailedPrecondition, match="finished"):
        machine.set_policy(policy(rounds=5))


def test_the_same_payload_from_a_second_client_is_refused_naming_its_owner():
    machine = machine_with(["a", "b", "c"])
    machine.advance(0.0)
    machine.accept("a", 1, SHA_A, 1.0)
    with pytest.raises(DuplicatePayload, match="same payload") as duplicate:
        machine.check_submission("b", 1, SHA_A, 0, 2.0)
    assert isinstance(duplicate.value, AlreadyExists) and duplicate.value.owner == "a"
    assert machine.check_submission("b", 1, SHA_B, 0, 2.0) is True
    assert machine.check_submission("a", 1, SHA_A, 0, 2.0) is False  # its own retry stays idempotent


def test_a_client_whose_update_copied_another_is_not_asked_again_and_the_round_closes_without_it():
    machine = machine_with(["a", "b", "c"])
    machine.advance(0.0)
    machine.accept("a", 1, SHA_A, 1.0)
    with pytest.raises(DuplicatePayload):
        machine.check_submission("b", 1, SHA_A, 0, 2.0)
    assert machine.decline("b", 1) == []
    assert "repeated another client's" in machine.task_for("b", 2.0).reason  # not TRAIN again: same seed, same bytes
    (closed,) = machine.accept("c", 1, SHA_B, 3.0)
    assert isinstance(closed, Closed) and closed.participants == ("a", "c")
