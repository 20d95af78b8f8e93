"""What the demo shows: live progress from the server's Status call, and the per-round table.

Progress is read the way an operator would read it, over gRPC with the operator token; the
final table is read from the server's ``history.jsonl``, the run's durable record.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from flora.v1 import coordinator_pb2, coordinator_pb2_grpc


class StatusReader:
    """Polls ``Status`` on a local server and renders a one-line summary when it changes."""

    def __init__(self, port: int, operator_token: str) -> None:
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self._metadata = (("authorization", f"Bearer {operator_token}"),)
        self._last = ""

    def close(self) -> None:
        self._channel.close()

    def poll(self) -> coordinator_pb2.StatusReply | None:
        """The server's status, or None while it cannot answer (starting, busy, restarting)."""
        try:
            return self._stub.Status(coordinator_pb2.StatusRequest(), metadata=self._metadata, timeout=5)
        except grpc.RpcError:
            return None

    def changed_line(self, status: coordinator_pb2.StatusReply) -> str | None:
        """A summary of ``status``, or None when it says the same as the previous one."""
        line = summarize(status)
        if line == self._last:
            return None
        self._last = line
        return line


def summarize(status: coordinator_pb2.StatusReply) -> str:
    """One line: run state, round, who submitted, global version."""
    clients = sorted(status.clients, key=lambda c: c.client_name)
    if status.state == "finished":
        return f"run finished at version {status.global_version}"
    if not status.HasField("round") or status.round.round == 0:
        return f"waiting for clients: {len(clients)} joined ({', '.join(c.client_name for c in clients)})"
    rnd = status.round
    submitted = set(rnd.submitted)
    parts = [f"{c.client_name} {'done' if c.client_id in submitted else c.state}" for c in clients if c.client_id in rnd.selected]
    return (
        f"round {rnd.round}/{status.run.rounds} {rnd.state}: {len(submitted)}/{len(rnd.selected)} updates "
        f"[{', '.join(parts)}]  global version {status.global_version}"
    )


def read_history(path: Path) -> list[dict[str, Any]]:
    """The server's round records (version 0 first when the server evaluated the base model)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


COLUMNS = ("round", "participants", "mean train loss", "validation loss", "MB up", "MB down", "seconds")


def participant(client: Mapping[str, Any], bases: Mapping[str, str]) -> str:
    """``client-2 (r=4, nf4)``: a client's name, rank and, when it is quantised, its base."""
    base = bases.get(client["name"], "none")
    return f"{client['name']} (r={client['rank']}{'' if base == 'none' else f', {base}'})"


def round_rows(history: Sequence[dict[str, Any]], bases: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per history record: participants, losses, traffic and the round's wall time.

    ``bases`` names the quantised base (nf4, fp4, int8) of the clients that train on one: the
    server's history does not know it, the launcher that started the clients does.
    """
    rows = []
    previous = None
    for record in history:
        committed = record.get("committed_unix")
        seconds = committed - previous if committed is not None and previous is not None else None
        previous = committed
        if record["round"] == 0:
            rows.append({"round": "0 (base)", "validation loss": record.get("validation_loss")})
            continue
        rows.append({
            "round": record["round"],
            "participants": ", ".join(participant(c, bases or {}) for c in sorted(record["clients"], key=lambda c: c["name"])),
            "mean train loss": record.get("train_loss"),
            "validation loss": record.get("validation_loss"),
            "MB up": round(record["bytes_in"] / 1e6, 3),
            "MB down": round(record["bytes_out"] / 1e6, 3),
            "seconds": None if seconds is None else round(seconds, 1),
        })
    return rows
