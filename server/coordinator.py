"""What each flora.v1 call does, in domain terms (protos/PROTOCOL.md), without gRPC.

The servicer hands every call here with the caller's token or client id and turns a raised
``Refusal`` into a status code. Replies are built as flora.v1 messages (plain data). All methods
run on the event loop: blocking work (receiving, validating and publishing uploads) goes through
``asyncio.to_thread``, and no ``await`` separates a final check from the record it guards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from flora.common.chunks import fsync_dir, publish
from flora.common.lora import lora_scaling
from flora.common.methods.wire import to_wire
from flora.common.payload import PayloadLimits
from flora.common.wire import Piece, artifact_chunks
from flora.server.auth import Credentials, token_digest
from flora.server.config import ServerSettings
from flora.server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, OutOfRange, Refusal, Unauthenticated
from flora.server.layout import Layout
from flora.server.lifecycle import RoundDriver
from flora.server.privacy_budget import privacy_status
from flora.server.rounds import DuplicatePayload, Finished, RoundMachine, RoundState, Train
from flora.server.store import ClientRecord, RunRecord, Store, Submission
from flora.server.uploads import (
    SCALING_RULE_NAMES,
    check_header,
    check_num_examples,
    finite_or_none,
    first_message,
    is_rslora,
    receive_payload,
    validate_durably,
)
from flora.v1 import coordinator_pb2 as pb, run_pb2, secagg_pb2, transfer_pb2

log = logging.getLogger(__name__)

CLIENT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_RETRY_AFTER_MS = 1000
_UPDATE, _MERGED = transfer_pb2.ARTIFACT_KIND_GLOBAL_UPDATE, transfer_pb2.ARTIFACT_KIND_MERGED_MODULES
_LORA = transfer_pb2.ARTIFACT_KIND_GLOBAL_LORA
_STORED_KINDS = {_UPDATE: "global", _MERGED: "merged", _LORA: "lora"}


@dataclass(frozen=True)
class Planned:
    """One artifact of a FetchGlobal stream: what to send and from which byte."""

    kind: int
    version: int
    path: Path
    sha256: str
    size: int
    offset: int = 0


def run_spec(settings: ServerSettings, run: RunRecord, shapes: dict[str, tuple[int, int]],
             max_update_norm: float) -> run_pb2.RunSpec:
    """The RunSpec clients receive at Join and in Status, with the limits their updates must respect."""
    return run_pb2.RunSpec(
        run_id=run.run_id, base_model=run.base_model, base_model_hash=run.base_model_hash,
        target_modules=[run_pb2.TargetModule(name=n, out_features=o, in_features=i) for n, (o, i) in sorted(shapes.items())],
        method=to_wire(run.method), rounds=settings.rounds, max_update_bytes=settings.max_update_bytes,
        chunk_size=settings.chunk_size, required_scaling=settings.required_scaling, global_lora_rank=settings.global_lora_rank,
        hints=run_pb2.TrainingHints(max_steps=settings.local_steps, local_epochs=settings.local_epochs,
                                    learning_rate=settings.learning_rate, batch_size=settings.batch_size),
        max_rank=settings.max_rank, max_update_norm=max_update_norm, max_weight_share=settings.max_weight_share,
        clip_norm=settings.clip_norm or 0.0, clip_median_multiple=settings.clip_median_multiple or 0.0,
        reject_median_multiple=settings.reject_median_multiple or 0.0,
        secure_aggregation=settings.secure_aggregation,
        secure_clip_norm=(settings.clip_norm or (0.0 if settings.dp_enabled else max_update_norm))
        if settings.secure_aggregation else 0.0,
        secure_stage_deadline_s=settings.secure_stage_deadline_s if settings.secure_aggregation else 0.0,
        dp_noise_multiplier=settings.dp_noise_multiplier or 0.0, dp_clip_norm=settings.dp_clip_norm or 0.0,
        dp_release=settings.dp_release if settings.dp_enabled else "",
    )


class Coordinator:
    """The run as the clients see it: identities, tasks, uploads, downloads and status."""

    def __init__(self, settings: ServerSettings, layout: Layout, store: Store, driver: RoundDriver,
                 run: RunRecord, credentials: Credentials) -> None:
        self.settings = settings
        self.layout = layout
        self.store = store
        self.driver = driver
        self.machine: RoundMachine = driver.machine
        self.shapes = driver.aggregator.shapes
        self.run = run
        self.spec = run_spec(settings, run, self.shapes, driver.aggregator.max_update_norm)
        self.credentials = credentials
        self.clients = {c.id: c for c in store.clients()}
        self._names = {c.name: c.id for c in self.clients.values()}
        self._last_submitted = store.last_submitted_rounds()
        self._told_finished: set[str] = set()  # clients that NextTask told FINISHED: done, not lost once gone
        self._limits = PayloadLimits(max_bytes=settings.max_update_bytes, max_rank=settings.max_rank)
        self.stopping = False
        for client in self.clients.values():
            credentials.register(client.id, client.token_sha256)
            self.machine.known(client.id, client.left)

    def use_settings(self, settings: ServerSettings) -> None:
        """Serve with changed round settings (``flora.server.round_settings``): the spec's rounds too."""
        self.settings = self.driver.settings = self.driver.aggregator.settings = settings
        self.spec = run_spec(settings, self.run, self.shapes, self.driver.aggregator.max_update_norm)

    def identify(self, token: str | None) -> str:
        """The client a call's token belongs to."""
        client_id = self.credentials.client_for(token)
        if client_id is None:
            raise Unauthenticated("unknown or missing client token; join first")
        return client_id

    @contextlib.contextmanager
    def active(self, client_id: str) -> Iterator[None]:
        """Count a call in progress as a sign of life for its whole duration."""
        self.machine.call_started(client_id, time.time())
        try:
            yield
        finally:
            self.machine.call_ended(client_id, time.time())

    # --- GetRun, Join ---------------------------------------------------------------------------

    def get_run(self) -> pb.GetRunReply:
        """The run, for a client to check its base model against before it joins."""
        return pb.GetRunReply(run=self.spec, global_version=self.machine.version)

    async def join(self, request: pb.JoinRequest, token: str | None) -> pb.JoinReply:
        """Register a new client or recognise a returning one (protos/PROTOCOL.md, Identity)."""
        name, caps = request.client_name, request.capabilities
        if not CLIENT_NAME.fullmatch(name):
            raise InvalidArgument(f"client_name {name[:80]!r} must match ^[A-Za-z0-9._-]{{1,64}}$")
        self._check_capabilities(caps)
        if request.base_model_hash != self.run.base_model_hash:
            raise FailedPrecondition(
                f"base_model_hash {request.base_model_hash[:12]!r} differs from the run's {self.run.base_model_hash[:12]!r}: "
                f"load the base model {self.run.base_model!r} unchanged"
            )
        now = time.time()
        returning = self.credentials.client_for(token)
        if returning is not None:
            client = self.clients[returning]
            if client.name != name:
                raise InvalidArgument(f"the token presented belongs to client {client.name!r}, not {name!r}")
            changed = self._changed_capabilities(client, caps)
            client = replace(client, **self._capability_fields(caps), left=False)
            self.store.rejoin_client(client)
            if changed and self.machine.withdraw(client.id):
                self.store.save_attempt(self.machine.current)
                log.info("client %s (%s) changed %s: out of round %d, which opened before the change; it takes part "
                         "with the new values from the next round that selects it", client.name, client.id,
                         ", ".join(changed), self.machine.current.number)
        else:
            token = self.credentials.issue_token(name, token)  # the provisioned token, or a fresh one
            if name in self._names:
                raise AlreadyExists(
                    f"client name {name!r} is taken: rejoin with the token kept in that client's state directory, "
                    "or pick another name"
                )
            client = ClientRecord(id=secrets.token_hex(8), name=name, token_sha256=token_digest(token), joined=now,
                                  **self._capability_fields(caps))
            await self._add_durably(client)
            self.credentials.register(client.id, client.token_sha256)
        self.clients[client.id] = client
        log.info("client %s (%s) %s: rank %d, alpha %g, %d examples, %s", client.name, client.id,
                 "rejoined" if returning else "joined", client.rank, client.alpha, client.num_examples, client.device or "?")
        self.machine.joined(client.id, now)
        if returning is not None:  # a new process: it holds none of an open secure attempt's secrets
            self._secure_gone(client.id)
        self.driver.advance()
        return pb.JoinReply(client_id=client.id, client_token=token, run=self.spec, global_version=self.machine.version)

    async def _add_durably(self, client: ClientRecord) -> None:
        """Record a new client on disk before anything else sees it; a failure leaves no trace.

        The name is held meanwhile (a second Join of it is refused as taken); if the row cannot
        be made durable it is deleted again, so the refused Join's retry finds the name free.
        """
        self.store.add_client(client)  # raises with nothing written
        self._names[client.name] = client.id
        try:
            await asyncio.to_thread(self.store.sync)  # the fsync off the loop
        except BaseException:
            del self._names[client.name]
            self.store.forget_client(client.id)
            raise

    @staticmethod
    def _capability_fields(caps: pb.Capabilities) -> dict:
        return {"rank": caps.rank, "alpha": caps.alpha, "scaling_rule": caps.scaling_rule, "num_examples": caps.num_examples,
                "device": caps.device[:64], "software_version": caps.software_version[:64]}

    @staticmethod
    def _changed_capabilities(client: ClientRecord, caps: pb.Capabilities) -> list[str]:
        """What of the LoRA's shape a rejoin changes ("rank 4 -> 8"); empty when nothing."""
        return [f"{key} {old!r} -> {new!r}" for key, old, new in (
            ("rank", client.rank, caps.rank), ("alpha", client.alpha, caps.alpha),
            ("scaling_rule", client.scaling_rule, caps.scaling_rule)) if old != new]

    def _check_capabilities(self, caps: pb.Capabilities) -> None:
        if not 1 <= caps.rank <= self.settings.max_rank:
            raise InvalidArgument(f"capabilities.rank {caps.rank} is outside [1, {self.settings.max_rank}]")
        check_num_examples(caps.num_examples, "capabilities.num_examples")
        if not (math.isfinite(caps.alpha) and caps.alpha > 0):
            raise InvalidArgument(f"capabilities.alpha {caps.alpha} must be a finite number > 0")
        if caps.scaling_rule not in SCALING_RULE_NAMES:
            raise InvalidArgument("capabilities.scaling_rule must be SCALING_RULE_STANDARD or SCALING_RULE_RSLORA")
        scaling = lora_scaling(caps.rank, caps.alpha, is_rslora(caps.scaling_rule))
        reason = self.settings.aggregation.admits(caps.rank, scaling, self.settings.global_lora_rank, self.settings.required_scaling)
        if reason is not None:
            raise FailedPrecondition(f"{self.run.method} run: capabilities (rank {caps.rank}, alpha {caps.alpha:g}): {reason}")

    # --- NextTask, Heartbeat, Leave ---------------------------------------------------------------

    async def next_task(self, client_id: str, request: pb.NextTaskRequest) -> pb.Task:
        """Long-poll: TRAIN, FINISHED, or WAIT once nothing changed for the allowed time."""
        loop = asyncio.get_running_loop()
        until = loop.time() + min(request.max_wait_ms / 1000, self.settings.long_poll_s)
        reconnecting = not self.machine.is_connected(client_id, time.time())
        with self.active(client_id):
            if reconnecting:  # this call may be what connects enough clients to open a round
                self.driver.advance()  # (otherwise nothing changed: the ticker sees deadlines)
            while True:
                changed = self.driver.changed
                secure = self.driver.secure
                if secure is not None and (step := secure.task_for(client_id)) is not None:
                    return pb.Task(secure=step)
                task = self.machine.task_for(client_id, time.time())
                if isinstance(task, Train):
                    warm = self.driver.aggregator.kept is not None  # the method keeps a global LoRA at this version
                    train = pb.TrainTask(
                        round=task.number, deadline_unix_ms=int(task.deadline * 1000), required_version=task.required_version,
                        hints=self.spec.hints, global_lora_version=task.required_version if warm else 0,
                        start_from_global_lora=warm)
                    if secure is not None:
                        train.secure.CopyFrom(secure.round_info(client_id, self.machine.current))
                    return pb.Task(train=train)
                if isinstance(task, Finished):
                    self._told_finished.add(client_id)
                    return pb.Task(finished=pb.FinishedTask(final_version=task.version))
                remaining = until - loop.time()
                if remaining <= 0 or self.stopping:
                    reason = "the server is shutting down" if self.stopping else task.reason
                    return pb.Task(wait=pb.WaitTask(retry_after_ms=_RETRY_AFTER_MS, reason=reason))
                # asyncio.timeout, not wait_for: no task per wait, which counts with 1,000 long-polls.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await changed.wait()

    def heartbeat(self, client_id: str, request: pb.HeartbeatRequest) -> pb.HeartbeatReply:
        """Record activity; tell the client whether the round it works on is still open for it."""
        self.machine.seen(client_id, time.time())
        current = self.machine.current
        is_open = current is not None and current.state is RoundState.OPEN
        still_open = is_open and current.number == request.round and client_id in current.selected
        return pb.HeartbeatReply(open_round=current.number if is_open else 0, global_version=self.machine.version,
                                 round_closed=request.round != 0 and not still_open)

    def leave(self, client_id: str) -> pb.LeaveReply:
        """Withdraw the client from selection until it joins again."""
        log.info("client %s (%s) left the run", self.clients[client_id].name, client_id)
        self.withdraw(client_id)
        return pb.LeaveReply()

    def withdraw(self, client_id: str) -> None:
        """Never select the client again until it joins again (Leave, or removal by the operator)."""
        self.store.set_left(client_id)  # stored first: a full disk leaves memory as the database has it
        self.machine.left(client_id)
        self.clients[client_id] = replace(self.clients[client_id], left=True)
        self._secure_gone(client_id)
        self.driver.advance()  # the round may have been waiting only for this client
        self.driver.notify()

    def _secure_gone(self, client_id: str) -> None:
        """Tell an open secure attempt that ``client_id`` will answer no step of it (no deadline waited)."""
        if self.driver.secure is not None:
            self.driver.secure.gone(client_id)

    # --- Status ---------------------------------------------------------------------------------------

    def status(self, viewer: str | None = None) -> pb.StatusReply:
        """The run, version and current round; every client for the operator (``viewer`` None), a
        client (``viewer``, its id) only itself and the counts: never another client's details."""
        now = time.time()
        current = self.machine.current
        if self.machine.finished:
            state = "finished"
        elif current.state in (RoundState.OPEN, RoundState.AGGREGATING):
            state = "running"
        else:
            state = "waiting_for_clients"
        reply = pb.StatusReply(run=self.spec, state=state, global_version=self.machine.version, num_clients=len(self.clients))
        if self.driver.privacy is not None:
            reply.privacy.CopyFrom(privacy_status(self.driver.privacy, self.settings.dp_clip_norm, self.driver.ended))
        if current is not None:
            reply.round.CopyFrom(pb.RoundStatus(
                round=current.number, state=current.state.value, selected=_visible(current.selected, viewer),
                submitted=_visible(current.accepted, viewer), deadline_unix_ms=int(current.deadline * 1000), quorum=current.quorum,
                min_clients=self.machine.policy.min_clients, available_clients=self.machine.available(now),
                num_selected=len(current.selected), num_submitted=len(current.accepted)))
        for client in self.clients.values() if viewer is None else [self.clients[viewer]]:
            presence = self.machine.clients.get(client.id)
            seen = presence.last_seen if presence and math.isfinite(presence.last_seen) else 0.0
            reply.clients.append(pb.ClientStatus(
                client_id=client.id, client_name=client.name, rank=client.rank, alpha=client.alpha,
                num_examples=client.num_examples, state=self._client_state(client, now), last_seen_unix_ms=int(seen * 1000),
                last_submitted_round=self._last_submitted.get(client.id, 0)))
        return reply

    def _client_state(self, client: ClientRecord, now: float) -> str:
        current = self.machine.current
        if client.left:
            return "left"
        if client.id in self._told_finished:
            return "finished"
        if not self.machine.is_connected(client.id, now):
            return "lost"
        if current is not None and client.id in current.accepted:
            return "submitted"
        if current is not None and current.state is RoundState.OPEN and client.id in current.selected:
            return "training"
        return "connected"

    # --- FetchGlobal ----------------------------------------------------------------------------------

    def plan_fetch(self, client_id: str, request: pb.FetchGlobalRequest) -> list[Planned]:
        """The artifacts a FetchGlobal request asks for, checked before a byte is streamed."""
        self.machine.seen(client_id, time.time())
        latest = self.machine.version
        kind, first, last = request.kind, request.from_version, request.to_version
        if kind == transfer_pb2.ARTIFACT_KIND_GLOBAL_ADAPTER:
            raise FailedPrecondition(
                "ARTIFACT_KIND_GLOBAL_ADAPTER (the stacked adapter) is no longer served: this server sends "
                "ARTIFACT_KIND_GLOBAL_UPDATE (payload flora.update.v1); upgrade the client to flora-fl >= 0.2"
            )
        if kind not in _STORED_KINDS:
            raise InvalidArgument(f"kind {kind} is not an artifact kind a client can fetch")
        if last > latest:
            raise OutOfRange(f"to_version {last} is beyond the latest version {latest}")
        if kind == _LORA and self.store.artifact("lora", last) is None:
            raise FailedPrecondition(f"this {self.run.method} run keeps no global LoRA at version {last}: "
                                     "its clients start that round fresh (TrainTask.start_from_global_lora is false)")
        if kind == _MERGED and last != latest:
            raise FailedPrecondition(f"merged weights are served for the latest version {latest} only, not {last}")
        wanted_versions = range(first + 1, last + 1) if kind == _UPDATE else [last]
        plan = [self._planned(kind, version) for version in wanted_versions]
        if kind == _UPDATE and request.allow_merged and not request.offset and last == latest and self._replay_costs_more(plan):
            plan = [self._planned(_MERGED, last)]
        if plan and request.offset:
            if request.offset > plan[0].size:
                raise OutOfRange(
                    f"offset {request.offset} is beyond the {plan[0].size}-byte artifact of version {plan[0].version}"
                )
            plan[0] = replace(plan[0], offset=request.offset)
        return plan

    def _planned(self, kind: int, version: int) -> Planned:
        artifact = self.store.artifact(_STORED_KINDS[kind], version)
        return Planned(kind, version, self.layout.absolute(artifact.path), artifact.sha256, artifact.size)

    def _replay_costs_more(self, updates: list[Planned]) -> bool:
        """Catch-up without replay: too many versions behind, or the merged modules are smaller."""
        if len(updates) > self.settings.catchup_versions:
            return True
        merged = self.store.artifact("merged", self.machine.version)
        return bool(updates) and merged is not None and merged.size < sum(item.size for item in updates)

    async def fetch(self, client_id: str, request: pb.FetchGlobalRequest) -> AsyncIterator[transfer_pb2.Chunk]:
        """The FetchGlobal stream: each planned artifact in chunks, read off the event loop."""
        plan = self.plan_fetch(client_id, request)
        sent, number = 0, self.machine.current.number if self.machine.current is not None else self.machine.version
        try:
            with self.active(client_id):
                for item in plan:
                    chunks = artifact_chunks(item.kind, item.version, item.path, item.sha256, self.settings.chunk_size, item.offset)
                    while (chunk := await asyncio.to_thread(_next_or_superseded, chunks, item.version)) is not None:
                        self.driver.bytes_out += len(chunk.data)
                        sent += len(chunk.data)
                        yield chunk
        finally:
            if sent:  # kept in the database, so that a killed server's history still counts them
                try:
                    self.store.add_bytes_out(number, sent)
                except (sqlite3.Error, OSError) as error:  # a count, not the run's state: log and go on
                    log.warning("round %d: %d downloaded bytes not recorded (%s)", number, sent, error)

    # --- SubmitUpdate --------------------------------------------------------------------------------

    async def submit(self, client_id: str, messages: AsyncIterator[transfer_pb2.UpdateChunk | Piece]) -> pb.SubmitReply:
        """Receive, validate and record one update (protos/PROTOCOL.md, SubmitUpdate)."""
        with self.active(client_id):
            header = await first_message(messages)
            check_header(header, self.clients[client_id], self.settings.max_update_bytes)
            if self._recorded(client_id, header) or not self._allowed_once(client_id, header):
                return self._duplicate(header)
            self._check_not_excluded(client_id, header)
            aggregator = self.driver.aggregator
            scaling = lora_scaling(header.rank, header.alpha, is_rslora(header.scaling_rule))
            # The client's start (a warm start: an SVD per module) needs the header alone: it is
            # worked out in a thread while the payload arrives, not after it.
            start = asyncio.ensure_future(asyncio.to_thread(aggregator.start_of, header.rank, scaling))
            start.add_done_callback(_retrieved)
            tmp = await receive_payload(header, messages, self.layout.tmp, self.settings.max_update_bytes)
            final = self.layout.update(header.round, client_id, header.sha256)
            try:
                await validate_durably(tmp, header, self.shapes, self._limits, aggregator.upload_norm_limit, aggregator.method,
                                       await start)
                await asyncio.to_thread(_publish_update, tmp, final)
            except BaseException:
                # Only on failure: a published file has no temporary name left, and looking one up
                # on the loop waits on the folder behind every other upload's rename.
                tmp.unlink(missing_ok=True)
                raise
            # From here to the record there is no await: the check and the record are atomic.
            try:
                new = self._allowed_once(client_id, header)
            except Refusal:
                final.unlink(missing_ok=True)  # named by this upload's own sha256: never a recorded file
                raise
            if not new:
                return self._duplicate(header)
            self._record(client_id, header, final)
            return pb.SubmitReply(accepted=True, round=header.round, message=f"update accepted for round {header.round}")

    async def advertise(self, client_id: str, request: secagg_pb2.AdvertiseKeysRequest) -> secagg_pb2.SecureReply:
        """Secure aggregation: a client's claims and public keys, recorded as its round's
        submission (the keys in the update's place), so that the round closes as usual."""
        secure = self.driver.secure
        if secure is None:
            raise FailedPrecondition("AdvertiseKeys: this run does not use secure aggregation; upload with SubmitUpdate")
        header = request.claims
        with self.active(client_id):
            check_header(header, self.clients[client_id], self.settings.max_update_bytes)
            if self._recorded(client_id, header) or not self._allowed_once(client_id, header):
                return secagg_pb2.SecureReply(accepted=True, message=f"keys already recorded for round {header.round}")
            secure.advertise(client_id, self.machine.current, request)
            final = self.layout.keys(header.round, client_id, header.sha256)
            await asyncio.to_thread(_publish_keys, self.layout.tmp, request.keys.SerializeToString(), final)
            self._record(client_id, header, final)
        return secagg_pb2.SecureReply(accepted=True, message=f"keys recorded for round {header.round}")

    def _check_not_excluded(self, client_id: str, header: transfer_pb2.UpdateHeader) -> None:
        """An update a failed aggregation excluded for failing on its own is not taken again (it
        would fail again). One excluded with every other because none failed alone is: its
        client retrains the reopened round with the same seed, to the same bytes."""
        reason = self.store.blamed(header.round).get((client_id, header.sha256))
        if reason is not None:
            raise FailedPrecondition(f"round {header.round}: this update (sha256 {header.sha256[:12]}) was excluded "
                                     f"from the round's aggregation: {reason[:300]}")

    def _allowed_once(self, client_id: str, header: transfer_pb2.UpdateHeader) -> bool:
        """``check_submission``; a copy of another client's accepted payload is refused and kept for the history."""
        try:
            return self.machine.check_submission(client_id, header.round, header.sha256, header.base_version, time.time())
        except DuplicatePayload as duplicate:
            owner = self.clients.get(duplicate.owner)
            reason = (f"duplicate payload: the same bytes (sha256 {header.sha256[:12]}) as the update accepted from "
                      f"client {owner.name if owner else duplicate.owner!r} ({duplicate.owner}); refused, counted once")
            self.store.add_exclusion(header.round, client_id, header.sha256, reason, time.time())
            log.warning("round %d: update from %s (%s) refused: %s", header.round, self.clients[client_id].name,
                        client_id, reason)
            self.driver.apply(self.machine.decline(client_id, header.round))  # the round may close without it
            raise

    def _recorded(self, client_id: str, header: transfer_pb2.UpdateHeader) -> bool:
        """Whether this exact update is already recorded for a round that has since closed."""
        if header.round == 0 or header.round > self.machine.version:
            return False
        prior = self.store.submission(header.round, client_id)
        return prior is not None and prior.sha256 == header.sha256

    @staticmethod
    def _duplicate(header: transfer_pb2.UpdateHeader) -> pb.SubmitReply:
        return pb.SubmitReply(accepted=True, duplicate=True, round=header.round,
                              message=f"this update was already accepted for round {header.round}")

    def _record(self, client_id: str, header: transfer_pb2.UpdateHeader, final: Path) -> None:
        """Store the accepted update, then (only once stored) move the round machine."""
        now = time.time()
        try:
            self.store.add_submission(Submission(
                round=header.round, client_id=client_id, sha256=header.sha256, path=self.layout.relative(final),
                size=header.total_bytes, rank=header.rank, alpha=header.alpha, scaling_rule=header.scaling_rule,
                num_examples=header.num_examples, base_version=header.base_version,
                train_loss=finite_or_none(header.train_loss),
                validation_loss=finite_or_none(header.validation_loss) if header.HasField("validation_loss") else None,
                steps=header.steps, train_seconds=max(0.0, finite_or_none(header.train_seconds) or 0.0), received=now))
        except BaseException:
            final.unlink(missing_ok=True)  # not recorded (a full disk, say): leave no file behind
            raise
        self._last_submitted[client_id] = header.round
        log.info("round %d: update from %s (%s) accepted: rank %d, %d examples, %d bytes", header.round,
                 self.clients[client_id].name, client_id, header.rank, header.num_examples, header.total_bytes)
        # No wake-up of its own: no waiting client's task changes with one upload (apply wakes
        # them all when it closes the round); one per upload cost O(clients^2) a round.
        self.driver.apply(self.machine.accept(client_id, header.round, header.sha256, now))


def _visible(ids: Iterable[str], viewer: str | None) -> list[str]:
    """Client ids as ``viewer`` may see them: all, sorted, for the operator (None); a client only its own."""
    return sorted(ids) if viewer is None else [viewer] if viewer in ids else []


def _next_or_superseded(chunks: Iterator[transfer_pb2.Chunk], version: int) -> transfer_pb2.Chunk | None:
    """The next chunk; merged weights replaced by a newer version before the read began are refused."""
    try:
        return next(chunks, None)
    except FileNotFoundError:
        raise FailedPrecondition(f"the merged weights of version {version} were superseded; fetch the latest") from None


def _publish_keys(tmp_dir: Path, keys: bytes, final: Path) -> None:
    """Keep an advertisement's public keys where a plain round keeps the update (durably)."""
    tmp = tmp_dir / f"keys-{secrets.token_hex(8)}.part"
    tmp.write_bytes(keys)
    _publish_update(tmp, final)


def _publish_update(tmp: Path, final: Path) -> None:
    """Move a validated upload to its final name durably (the round folder included)."""
    if not final.parent.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        fsync_dir(final.parent.parent)
    publish(tmp, final)


def _retrieved(future: asyncio.Future) -> None:
    """Mark a background result as seen: an upload that fails while its start is being worked
    out never awaits it, and asyncio would log the start's own error as never retrieved."""
    if not future.cancelled():
        future.exception()
