"""``flora-admin status``: the run as an operator reads it, once or live.

Built only from the server's ``Status`` reply, so what the console shows is what any script
gets with ``--json`` (the reply as protobuf's canonical JSON). On a terminal the tables are
drawn with rich and ``--watch`` redraws them in place; elsewhere (a log, a pipe) it prints
plain text, one snapshot per refresh.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TextIO

import grpc
from google.protobuf.json_format import MessageToDict

from flora.common.tables import format_table
from flora.v1 import coordinator_pb2 as pb

CLIENT_COLUMNS = ("client", "state", "rank", "examples", "last seen", "last round", "MB up")
ROUND_COLUMNS = ("round", "clients", "train loss", "validation loss", "MB up", "MB down", "committed")
DP_ROUND_COLUMNS = ROUND_COLUMNS + ("epsilon",)  # under differential privacy: spent once the round committed


def as_json(reply: pb.StatusReply | pb.ListClientsReply) -> dict[str, Any]:
    """The reply as protobuf's canonical JSON mapping (field names in lowerCamelCase)."""
    return MessageToDict(reply, always_print_fields_with_no_presence=True)


def _clock(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%H:%M:%S") if ms > 0 else "-"


def ago(ms: int, now: float) -> str:
    return f"{max(0.0, now - ms / 1000):.0f}s ago" if ms > 0 else "-"


def _loss(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


def client_state(client: pb.ClientStatus, status: pb.StatusReply, now: float) -> str:
    """The console's words: training / uploaded / late / left, as the issue's operators asked."""
    if client.state == "submitted":
        return "uploaded"
    if client.state == "training" and status.round.deadline_unix_ms and now * 1000 > status.round.deadline_unix_ms:
        return "late"
    return client.state


def headline(status: pb.StatusReply, now: float) -> str:
    """One line: run, state, version, round and attempt, deadline."""
    line = f"run {status.run.run_id} ({status.state}): version {status.global_version}/{status.run.rounds}"
    if status.HasField("round") and status.round.round:
        rnd = status.round
        if rnd.state in ("waiting", "abandoned") and rnd.available_clients < rnd.min_clients:
            return line + (f", round {rnd.round} {rnd.state}: needs {rnd.min_clients} connected clients, has "
                           f"{rnd.available_clients} (flora-admin settings --set min_clients=N changes the need)")
        left = rnd.deadline_unix_ms / 1000 - now
        line += (f", round {rnd.round} (attempt {rnd.attempt}) {rnd.state}: {rnd.num_submitted or len(rnd.submitted)}/{rnd.num_selected or len(rnd.selected)} updates, quorum {rnd.quorum}, "
                 f"deadline {_clock(rnd.deadline_unix_ms)} UTC" + (f" (in {left:.0f}s)" if left > 0 and rnd.state == "open" else ""))
    return line


def privacy_line(status: pb.StatusReply) -> str:
    """Under differential privacy, the spent budget in one line (and why the run ended, if the budget ended it)."""
    if not status.HasField("privacy"):
        return ""
    dp = status.privacy
    target = f" of target {dp.target_epsilon:g}" if dp.target_epsilon else ""
    line = (f"privacy: epsilon {dp.epsilon:.4g} spent{target} at delta {dp.delta:.3g} ({dp.accountant}, noise "
            f"multiplier {dp.noise_multiplier:g}, clip norm {dp.clip_norm:g}, {dp.mechanisms_per_round} release(s) per round)")
    return line + (f"\n{dp.ended}" if dp.ended else "")


def _round_columns(status: pb.StatusReply) -> tuple[str, ...]:
    columns = DP_ROUND_COLUMNS if status.HasField("privacy") else ROUND_COLUMNS
    return columns + ("secure",) if status.run.secure_aggregation else columns


def _secure_cell(summary: pb.RoundSummary) -> str:
    """A secure round's survivors and the cost of its steps ("-" for a plain round)."""
    if not summary.HasField("secure"):
        return "-"
    secure = summary.secure
    recovered = f" (+{secure.dropouts_recovered} recovered)" if secure.dropouts_recovered else ""
    return (f"{secure.survivors} survivors{recovered}, {(secure.bytes_up + secure.bytes_down) / 1e6:.3g} MB, "
            f"{secure.seconds:.1f}s")


def client_rows(status: pb.StatusReply, now: float) -> list[dict[str, Any]]:
    """One row per client."""
    return [{"client": c.client_name, "state": client_state(c, status, now), "rank": c.rank, "examples": c.num_examples,
             "last seen": ago(c.last_seen_unix_ms, now), "last round": c.last_submitted_round or "-",
             "MB up": round(c.bytes_submitted / 1e6, 3)} for c in status.clients]


def round_rows(status: pb.StatusReply) -> list[dict[str, Any]]:
    """One row per recent round."""
    return [{"round": r.round, "clients": r.num_clients, "train loss": _loss(r.train_loss),
             "validation loss": _loss(r.validation_loss), "MB up": round(r.bytes_in / 1e6, 3),
             "MB down": round(r.bytes_out / 1e6, 3), "committed": _clock(r.committed_unix_ms),
             "epsilon": f"{r.dp_epsilon:.4g}", "secure": _secure_cell(r)} for r in status.recent_rounds]


def render_plain(status: pb.StatusReply, now: float) -> str:
    """The status as plain text: headline, clients table, recent rounds table."""
    parts = [headline(status, now), *filter(None, [privacy_line(status)]), "",
             format_table(client_rows(status, now), CLIENT_COLUMNS)]
    if status.recent_rounds:
        parts += ["", format_table(round_rows(status), _round_columns(status))]
    return "\n".join(parts) + "\n"


def render_rich(status: pb.StatusReply, now: float):
    """The status as rich renderables (a headline and two tables)."""
    from rich.console import Group
    from rich.table import Table

    def table(title: str, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> Table:
        result = Table(title=title, title_justify="left")
        for column in columns:
            result.add_column(column, justify="left" if column in ("client", "state", "committed") else "right")
        for row in rows:
            result.add_row(*("" if row.get(c) is None else str(row[c]) for c in columns))
        return result

    items = [headline(status, now), *filter(None, [privacy_line(status)]),
             table("clients", CLIENT_COLUMNS, client_rows(status, now))]
    if status.recent_rounds:
        items.append(table("recent rounds", _round_columns(status), round_rows(status)))
    return Group(*items)


def watch(fetch: Callable[[], pb.StatusReply], out: TextIO, interval: float, terminal: bool,
          iterations: int | None = None) -> None:
    """Refresh until interrupted (or ``iterations`` snapshots): live on a terminal, appended otherwise.

    A server that does not answer (restarting, briefly down) does not end the watch: it shows
    "server unreachable since HH:MM:SS UTC" and picks up again when the server answers.
    """
    view = _Watched(fetch)
    if terminal:
        from rich.live import Live

        with Live(view.rich(), refresh_per_second=4) as live:
            count = 1
            while iterations is None or count < iterations:
                time.sleep(interval)
                live.update(view.rich())
                count += 1
        return
    count = 0
    while iterations is None or count < iterations:
        if count:
            time.sleep(interval)
        out.write(f"--- {datetime.now(timezone.utc):%H:%M:%S} UTC\n" + view.plain())
        out.flush()
        count += 1


# A server restarting or briefly unreachable; any other refusal (a wrong token) ends the watch.
_PASSING = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class _Watched:
    """The latest snapshot of a watched server, or since when it has not answered."""

    def __init__(self, fetch: Callable[[], pb.StatusReply]) -> None:
        self._fetch = fetch
        self._down_since: float | None = None

    def _poll(self) -> pb.StatusReply | str:
        try:
            status = self._fetch()
        except grpc.RpcError as err:
            if err.code() not in _PASSING:
                raise
            self._down_since = self._down_since or time.time()
            return (f"server unreachable since {_clock(int(self._down_since * 1000))} UTC "
                    f"({err.code().name}: {(err.details() or '')[:120]}); still watching\n")
        self._down_since = None
        return status

    def plain(self) -> str:
        polled = self._poll()
        return polled if isinstance(polled, str) else render_plain(polled, time.time())

    def rich(self):
        polled = self._poll()
        return polled.rstrip("\n") if isinstance(polled, str) else render_rich(polled, time.time())
