"""Secure aggregation on the server: one round attempt's stages over the wire (issue 30).

The crypto layer (``flora.common.secagg.server.ServerRound``) decides what is valid; the maths
layer (``plan_round``, ``server_step``) turns the unmasked sums into the method's
``RoundResult``; this module connects them to the round machine and the clients:

- when an attempt opens, its selected clients are numbered 0..n-1 (sorted by client id) and
  each TrainTask says which number is the client's (``round_info``);
- each client's AdvertiseKeys is its "upload" for the round machine (the coordinator records it
  as a submission without a payload), so the round closes by the usual rules;
- the closed round's aggregation (``aggregate``) then hands out steps through NextTask
  (``task_for``): SHARE, then per masked stage MASK and UNMASK, each open until every expected
  client answered or ``secure_stage_deadline_s`` passed, and ends in the aggregator's usual
  ``write_round``: the downlink and persistence are those of a plain round.

What the server holds at any time: public keys, ciphertexts it cannot open, the running sum of
the masked vectors of the stage (and, on disk while the stage's MASK step is open, each accepted
masked upload as received: masked, so nothing of one client), and the unmasked sums. A client that shares its keys but sends
no masked input in stage 1 is recovered from its neighbours' shares, and the round is over the
survivors (``_passes``); a restart resumes the attempt from what ``secure_state`` saved. Under
differential privacy the clients also clip to dp_clip_norm and the server adds the release's noise
to each unmasked sum (``flora.common.secagg.finish``); pass 1's Q is recorded as released
(``released``: server/dp_releases.py) before any client can fetch it. Any other failure (fewer than the threshold
survive a stage, a client lost after stage 1's sum, a saved attempt not to be trusted) raises
``SecAggError``; the driver then excludes the attempt's advertisements as a whole and the round
reopens: the clients train again with fresh keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import replace

import numpy as np

from flora.common.lora import lora_scaling
from flora.common.methods import RoundResult
from flora.common.robust import Decision, RobustPolicy, decide
from flora.common.secagg.errors import SecAggError
from flora.common.omega import round_seed as omega_round_seed
from flora.common.privacy.release import secret_generator
from flora.common.secagg.finish import Noise, Sketch, server_step
from flora.common.secagg.fixedpoint import decode, encode
from flora.common.secagg.graph import default_degree, default_threshold
from flora.common.secagg.messages import (
    AdvertiseKeys, EncryptedShare, MaskedInput, MaskRequest, RevealedShare, ShareKeys, UnmaskResponse,
)
from flora.common.secagg.plan import KINDS, SKETCH, RoundPlan, plan_round, vector_length
from flora.common.secagg.server import ServerRound
from flora.common.secagg.wire import keys_digest, sketch_bytes
from flora.common.wire import Piece
from flora.common.weights import client_weights
from flora.server.aggregator import Aggregator, RoundOutput
from flora.server.config import ServerSettings
from flora.server.errors import FailedPrecondition, InvalidArgument, Unavailable
from flora.server.rounds import Round, RoundState
from flora.server.secure_attempt import Attempt
from flora.server.secure_state import GroupCommit, Identity, stored_adverts
from flora.server.secure_transfer import (
    INBOX_KIND, SKETCH_KIND, Payload, inbox_payloads, masked_header, masked_vectors, payload_chunks, step_payloads,
)
from flora.server.store import Submission
from flora.server.uploads import is_rslora
from flora.v1 import secagg_pb2 as sa, transfer_pb2

log = logging.getLogger(__name__)

ROUND_SEED_INFO = "flora-secagg/v1/round"


def round_seed(run_id: str, number: int, attempt: int) -> bytes:
    """The attempt's public 32-byte round seed (the neighbour graph's)."""
    return hashlib.sha256(f"{ROUND_SEED_INFO}:{run_id}:{number}:{attempt}".encode()).digest()


def refusal(error: SecAggError) -> FailedPrecondition | InvalidArgument:
    """A protocol refusal as the status a client gets: out of turn is FAILED_PRECONDITION."""
    kind = FailedPrecondition if error.field in ("stage", "round_id") else InvalidArgument
    return kind(f"secure aggregation: {error}")


class SecureRounds:
    """The server's side of secure aggregation, one round attempt at a time."""

    def __init__(self, settings: ServerSettings, aggregator: Aggregator, run_id: str, notify: Callable[[], None],
                 released: Callable[[int, int], Awaitable[None]] | None = None) -> None:
        self.settings = settings
        self.aggregator = aggregator
        self.run_id = run_id
        self.notify = notify
        self.released = released  # under DP: records (round, attempt)'s pass 1 before Q leaves (server/dp_releases.py)
        self.stages = 2 if KINDS[settings.aggregation.name] == SKETCH else 1
        self.folder = aggregator.layout.root / "secure"  # the saved attempt (server/secure_state.py)
        self._attempt: Attempt | None = None

    @property
    def clip_norm(self) -> float | None:
        """C: clip_norm when set, else the bound every plain upload is checked against; under DP,
        where no upload is refused by its norm, clip_norm alone (None: the DP clip bounds)."""
        if self.settings.dp_enabled:
            return self.settings.clip_norm
        return self.settings.clip_norm or self.aggregator.max_update_norm

    # --- round open: numbering and advertising --------------------------------------------------

    def _current(self, current: Round) -> Attempt:
        """The protocol state of the machine's current attempt (a fresh one for a new attempt)."""
        att = self._attempt
        if att is None or (att.number, att.attempt) != (current.number, current.attempt):
            ids = tuple(sorted(current.selected))
            degree = default_degree(len(ids))
            seed = round_seed(self.run_id, current.number, current.attempt)
            try:
                server = ServerRound(current.number, seed, range(len(ids)), self.stages, default_threshold(degree), degree)
            except SecAggError as error:
                raise refusal(error) from None
            att = self._attempt = Attempt.fresh(self.folder, Identity(self.run_id, current.number, current.attempt, ids,
                                                                      seed), server)
        return att

    def resume(self, current: Round | None) -> None:
        """At start, before serving: take up the attempt a restart interrupted (one not to be trusted fails)."""
        if current is not None and current.state in (RoundState.OPEN, RoundState.AGGREGATING):
            with contextlib.suppress(FailedPrecondition, InvalidArgument):  # refused for these clients: said when asked
                if not self._current(current).resume():
                    self._attempt = None  # aggregate() then fails the attempt: the round reopens

    def round_info(self, client_id: str, current: Round) -> sa.SecureRound:
        """TrainTask.secure: the client's number and the attempt's protocol parameters."""
        att = self._current(current)
        server = att.server
        return sa.SecureRound(client_index=att.index(client_id), participants=len(att.ids), round_seed=att.seed,
                              threshold=server.threshold, degree=server.degree, stages=self.stages)

    def advertise(self, client_id: str, current: Round, request: sa.AdvertiseKeysRequest) -> None:
        """Take a client's public keys for the current attempt (validated before anything changes)."""
        att = self._current(current)
        index = att.index(client_id)
        if request.keys.client != index:
            raise InvalidArgument(f"keys.client {request.keys.client} is not this client's index {index} in round "
                                  f"{current.number}")
        if request.claims.sha256 != keys_digest(request.keys.channel_key, request.keys.mask_keys):
            raise InvalidArgument("claims.sha256 is not the sha256 of keys.channel_key and keys.mask_keys")
        advert = AdvertiseKeys(index, current.number, request.keys.channel_key, tuple(request.keys.mask_keys))
        try:
            att.server.receive_keys(advert)
        except SecAggError as error:
            raise refusal(error) from None
        att.bytes_up["advertise"] += request.ByteSize()

    def gone(self, client_id: str) -> None:
        """A client that advertised keys in this attempt is known gone: it left or was removed, or it
        joined again (a new process holds none of the attempt's secrets). The open step closes as
        soon as every other client asked has answered, and no later step asks it: a dropout the
        server knows of costs no deadline. (Before it advertised, a rejoined client trains again.)"""
        att = self._attempt
        if att is None or client_id not in att.ids or att.ids.index(client_id) not in att.server.adverts:
            return
        if att.release(att.ids.index(client_id)):
            log.info("round %d: client %s is gone; the secure step no longer waits for it", att.number, client_id)

    # --- the steps after the round closed ---------------------------------------------------------

    def task_for(self, client_id: str) -> sa.SecureTask | None:
        """The step this client is asked to do now, if any."""
        att = self._attempt
        if att is None or client_id not in att.ids:
            return None
        step = att.steps.get(att.ids.index(client_id))
        if step is not None:
            att.bytes_down[_label(step)] += step.ByteSize()
        return step

    async def _answer(self, client_id: str, kind: str, number: int, stage: int) -> tuple[Attempt, int]:
        """``_asked``, once a resumed attempt's interrupted step is handed out again."""
        if (att := self._attempt) is not None:
            await att.handed_out(self.settings.secure_stage_deadline_s)
        return self._asked(client_id, kind, number, stage)

    def _asked(self, client_id: str, kind: str, number: int, stage: int) -> tuple[Attempt, int]:
        """The attempt and client index an answer of ``kind`` belongs to; refused when not asked."""
        att = self._attempt
        if att is None or att.number != number:
            raise FailedPrecondition(f"secure aggregation: round {number} has no {kind} step open")
        index = att.index(client_id)
        step = att.steps.get(index)
        if step is None or step.WhichOneof("step") != kind or (kind != "share" and getattr(step, kind).stage != stage):
            raise FailedPrecondition(f"secure aggregation: no {kind} step of stage {stage} is open for this client")
        return att, index

    async def _answered(self, att: Attempt, index: int, kind: str, size: int, commit: GroupCommit) -> sa.SecureReply:
        att.bytes_up[_label(await att.save_answer(index, commit))] += size  # acknowledged once saved
        return sa.SecureReply(accepted=True, message=f"{kind} recorded")

    async def share(self, client_id: str, request: sa.ShareKeysRequest) -> sa.SecureReply:
        att, index = await self._answer(client_id, "share", request.round, 0)
        shares = tuple(EncryptedShare(index, s.receiver, att.number, s.ciphertext) for s in request.shares)
        if any(s.sender != index for s in request.shares):
            raise InvalidArgument(f"shares: a share claims a sender other than this client ({index})")
        try:
            att.server.receive_shares(ShareKeys(index, att.number, shares))
        except SecAggError as error:
            raise refusal(error) from None
        return await self._answered(att, index, "share", request.ByteSize(), att.saved.state)

    async def masked(self, client_id: str, messages: AsyncIterator[sa.MaskedChunk | Piece]) -> sa.SecureReply:
        """A SubmitMasked stream: the header checked against the open step, the bytes received and
        verified (one stream per client at a time), then the vectors added to the stage's sum."""
        header = await masked_header(messages)
        att, index = await self._answer(client_id, "mask", header.round, header.stage)
        if index in att.streams:
            raise Unavailable("SubmitMasked: another stream of this client is in progress; retry once it ended")
        att.streams.add(index)
        closes = att.steps[index].deadline_unix_ms / 1000  # a stalled stream holds the step's buffer no longer
        try:  # the client's stream counts as in progress until its upload is kept and added
            try:
                async with asyncio.timeout(max(0.0, closes - time.time())):
                    vectors = await masked_vectors(header, messages, att.server.lengths)
            except TimeoutError:
                raise FailedPrecondition(f"secure aggregation: stage {header.stage}'s MASK step closed at its deadline "
                                         "during the upload") from None
            message = MaskedInput(index, att.number, header.stage, vectors)
            self._take(att, client_id, header, att.server.check_masked, message)
            await att.saved.save_upload(header.stage, index, vectors)  # kept durably as received before it counts
            try:
                self._take(att, client_id, header, att.server.receive_masked, message)  # the step may have closed meanwhile
            except FailedPrecondition:  # not counted: its file goes (the step's own deletion may have run already)
                await att.saved.forget_upload(header.stage, index)
                raise
        finally:
            att.streams.discard(index)
        att.uploads[index] = header.sha256  # the state that lists it is saved before the acknowledgement
        return await self._answered(att, index, "mask", header.ByteSize() + header.total_bytes, att.saved.state)

    def _take(self, att: Attempt, client_id: str, header: sa.MaskedHeader, receive: Callable[[MaskedInput], None],
              message: MaskedInput) -> None:
        """``receive`` (check or add) a masked input, refused when the caller's MASK step of this attempt closed."""
        if self._asked(client_id, "mask", header.round, header.stage)[0] is not att:
            raise FailedPrecondition(f"secure aggregation: round {header.round}'s attempt changed during the upload")
        try:
            receive(message)
        except SecAggError as error:
            raise refusal(error) from None

    def fetch(self, client_id: str, request: sa.FetchSecureRequest) -> Iterator[transfer_pb2.Chunk]:
        """A FetchSecure stream: a payload of the caller's open MASK step, from the request's offset.

        Each chunk is cut from the payload the open step holds when the chunk is sent, and nothing
        but that chunk is held between two: a stalled stream keeps neither Q nor its attempt alive,
        and it ends (FAILED_PRECONDITION) once the step closed or its payload changed."""
        offset, sha256 = request.offset, None
        while True:
            chunk = self._next_chunk(client_id, request, offset)
            if sha256 not in (None, chunk.sha256):
                raise FailedPrecondition(f"secure aggregation: stage {request.stage}'s payload changed during the fetch")
            offset, sha256 = offset + len(chunk.data), chunk.sha256
            yield chunk
            if offset >= chunk.total_bytes:  # the last piece (an empty payload's, or a resume at its end: one empty piece)
                return

    def _next_chunk(self, client_id: str, request: sa.FetchSecureRequest, offset: int) -> transfer_pb2.Chunk:
        """The chunk at ``offset`` of the caller's open MASK step's payload."""
        att, index = self._asked(client_id, "mask", request.round, request.stage)
        at = sa.FetchSecureRequest(round=request.round, stage=request.stage, kind=request.kind, offset=offset)
        chunk = next(iter(payload_chunks(att.downloads.get((index, request.kind)), at, self.settings.chunk_size)))
        att.bytes_down[f"mask{request.stage}"] += len(chunk.data)
        return chunk

    async def unmask(self, client_id: str, request: sa.UnmaskRequest) -> sa.SecureReply:
        att, index = await self._answer(client_id, "unmask", request.round, request.stage)
        def revealed(items: Sequence[sa.RevealedShare]) -> tuple[RevealedShare, ...]:
            return tuple(RevealedShare(r.owner, r.share) for r in items)
        response = UnmaskResponse(index, att.number, request.stage, revealed(request.self_shares), revealed(request.key_shares))
        try:
            att.server.receive_unmask(response)
        except (SecAggError, ValueError) as error:  # a malformed share is a ValueError of its parser
            raise refusal(error if isinstance(error, SecAggError) else SecAggError("share", str(error))) from None
        return await self._answered(att, index, "unmask", request.ByteSize(), att.saved.state)

    async def _step(self, att: Attempt, tasks: dict[int, sa.SecureTask], label: str) -> None:
        """Ask every client of ``tasks`` for its step; return when all answered or at the deadline."""
        clock = time.perf_counter()
        deadline = time.time() + self.settings.secure_stage_deadline_s
        for task in tasks.values():
            task.round, task.deadline_unix_ms = att.number, int(deadline * 1000)
        att.steps, att.done = {i: t for i, t in tasks.items() if i not in att.gone}, asyncio.Event()
        if not att.steps:
            att.done.set()
        att.resumed.set()
        self.notify()
        try:
            async with asyncio.timeout(self.settings.secure_stage_deadline_s):
                await att.done.wait()
        except TimeoutError:
            missing = sorted(att.ids[i] for i in att.steps)
            log.warning("round %d: secure %s step closed at its deadline without %s", att.number, label, ", ".join(missing))
        att.steps = {}
        att.seconds[label] += time.perf_counter() - clock

    # --- the aggregation --------------------------------------------------------------------------

    async def aggregate(self, number: int, submissions: Sequence[Submission]) -> RoundOutput:
        """Run (or resume) the closed round's stages and write its version as a plain round's would be."""
        att = self._attempt
        if att is not None and att.number == number and att.server.phase == "advertise":
            for advert in await asyncio.to_thread(stored_adverts, self.aggregator.layout, att.saved.identity, submissions,
                                                  set(att.server.adverts)):  # those a restart took from memory
                att.server.receive_keys(advert)
        advertised = set() if att is None or att.number != number else {att.ids[i] for i in att.server.adverts}
        if advertised != {s.client_id for s in submissions}:
            raise SecAggError("round", f"round {number}'s advertised keys are not all held (a new attempt, or a saved "
                                       "attempt that cannot be trusted): the attempt starts over")
        try:
            return await self._run(att, number, submissions)
        finally:
            att.resumed.set()  # answers waiting for a resumed step are refused now, not held

    async def _run(self, att: Attempt, number: int, submissions: Sequence[Submission]) -> RoundOutput:
        server = att.server
        if server.phase == "advertise":
            att.bundles = server.close_keys()
            await att.saved.state.flush()
        if server.phase == "share":
            await self._step(att, {i: sa.SecureTask(share=sa.ShareStep(participants=b.participants, neighbours=[
                _keys(a) for a in b.neighbours])) for i, b in att.bundles.items() if i not in server.sealed}, "share")
            att.inboxes = server.close_shares()
            await att.saved.state.flush()
        planned = sorted((s for s in submissions if att.ids.index(s.client_id) in server.sealed),
                         key=lambda s: att.ids.index(s.client_id))
        plan, decisions = await asyncio.to_thread(self._plan, number, planned)  # warm starts: an SVD per module
        att.saved.announce(plan)
        result, survivors = await self._passes(att, plan)
        total = sum(d.weight for s, d in zip(planned, decisions) if att.ids.index(s.client_id) in survivors)
        weighed = {s.client_id: replace(d, weight=d.weight / total) for s, d in zip(planned, decisions)
                   if att.ids.index(s.client_id) in survivors}
        left_out = Decision(norm=None, raw_weight=0.0, weight=0.0, clip_factor=None, rejected=True)
        seconds = {f"secure_{k}": v for k, v in att.seconds.items()}
        secure = {"survivors": len(survivors), "dropped": len(att.ids) - len(survivors),
                  "dropouts_recovered": len(planned) - len(survivors), "bytes_up": dict(att.bytes_up),
                  "bytes_down": dict(att.bytes_down), "seconds": {k: round(v, 4) for k, v in att.seconds.items()}}
        log.info("round %d: secure aggregation over %d of %d clients (%d recovered): %d bytes up, %d down, %.2fs in "
                 "the steps", number, len(survivors), len(att.ids), secure["dropouts_recovered"], sum(att.bytes_up.values()),
                 sum(att.bytes_down.values()), sum(att.seconds.values()))
        output = await asyncio.to_thread(self.aggregator.write_round, number, result,
                                         [weighed.get(s.client_id, left_out) for s in submissions], math.nan, seconds)
        return replace(output, secure=secure)

    async def _passes(self, att: Attempt, plan: RoundPlan) -> tuple[RoundResult, frozenset[int]]:
        """The plan's masked passes (from where a resumed attempt stopped); the result over the survivors.

        A client that drops after masking stage 1 is recovered from its neighbours' shares: the
        sums then hold the survivors alone, and the survivors' weights p_k are renormalized to
        sum to 1 (each sum divided by their total). One that drops in a later stage is not: Q
        spans the range of the stage-1 survivors' sum, so the attempt fails and starts over.
        """
        server, planned = att.server, tuple(sorted(att.server.sealed))  # the sharers: stage 1's active set
        result, sketch, survivors = None, att.sketch, att.survivors or frozenset(planned)
        noise = Noise(self.settings.dp_noise_multiplier, secret_generator()) if self.settings.dp_enabled else None
        for stage in range(server.stage + (server.phase == "open"), plan.passes + 1):
            if server.phase == "open":
                if stage > 1:  # pass 1's Q and survivors before the state that says pass 2 is open
                    await att.saved.save_sketch(sketch, survivors)
                server.open_stage(stage, (vector_length(plan, stage),))
                att.uploads = {}
                await att.saved.state.flush()
            request = MaskRequest(server.round_id, stage, tuple(sorted(server.active)), server.lengths)
            if set(request.active) != survivors:
                raise SecAggError("survivors", f"a client of stage {stage - 1}'s sum left before stage {stage}; "
                                               "the attempt starts over")
            if server.phase == "mask":
                att.downloads = await asyncio.to_thread(lambda: step_payloads(  # Q: up to GBs, serialised once
                    request.active, inbox_payloads(att.inboxes) if stage == 1 else {},
                    sketch_bytes(plan, sketch.q) if sketch is not None else None))
                await self._step(att, {i: sa.SecureTask(mask=self._mask_step(request, plan, stage, att.downloads, i))
                                       for i in request.active if i not in server.masked_from}, f"mask{stage}")
                att.downloads = {}
                await att.saved.masked.flush()  # the sum the unmask request is for, then the request; a
                server.close_masked()           # full disk here: the retried attempt closes the step again
                att.uploads = {}
            await att.saved.state.flush()  # past the MASK step (again in a retry: a full disk may have stopped it)
            await att.saved.drop_uploads(stage)  # the sum holds them now
            unmask = server.request
            if unmask.dropped and stage > 1:
                raise SecAggError("survivors", f"{len(unmask.dropped)} client(s) sent no masked input in stage {stage}; "
                                               "the attempt starts over")
            await self._step(att, {i: sa.SecureTask(unmask=sa.UnmaskStep(stage=stage, survivors=unmask.survivors,
                                                                          dropped=unmask.dropped))
                                   for i in unmask.survivors if i not in server.reveals}, f"unmask{stage}")
            await att.saved.state.flush()  # after the answers' own writes: none may save the state past this point
            unmasked = await asyncio.to_thread(server.close_unmask)
            survivors = frozenset(unmasked.survivors)
            over, summed = _over_survivors(plan, planned, survivors, unmasked.sums[0])
            step = await asyncio.to_thread(server_step, over, stage, summed, sketch, self.aggregator.precision, noise)
            result, sketch = (None, step) if isinstance(step, Sketch) else (step, sketch)
            if result is None:  # pass 2 is next, with this Q
                if noise is not None and self.released is not None:  # first: Q = orth(Y + N1) is a release
                    await self.released(att.number, att.attempt)
                att.sketch, att.survivors = sketch, survivors  # a retry of the attempt (a full disk) goes on with it
        if unmask.dropped:
            log.warning("round %d: %d client(s) dropped after sharing; recovered, the round is over %d survivors",
                        att.number, len(unmask.dropped), len(survivors))
        return result, survivors

    def _plan(self, number: int, planned: Sequence[Submission]) -> tuple[RoundPlan, list]:
        """The round's public plan over the clients that shared, and the history's decisions."""
        claimed = client_weights([s.num_examples for s in planned], self.settings.weighting.value)
        policy = RobustPolicy(max_weight_share=self.settings.max_weight_share if self.settings.max_weight_share < 1 else None)
        decisions = [replace(d, norm=None, clip_factor=None)  # the server never sees a norm, nor who clipped
                     for d in decide([1.0] * len(planned), claimed, policy)]
        scalings = [lora_scaling(s.rank, s.alpha, is_rslora(s.scaling_rule)) for s in planned]
        plan = plan_round(self.settings.aggregation, self.aggregator.kept, self.aggregator.shapes, [s.rank for s in planned],
                          scalings, [d.weight for d in decisions], self.clip_norm, self.sketch_seed(number),
                          dp_clip_norm=self.settings.dp_clip_norm,
                          dense=self.settings.dp_enabled and self.settings.dp_release == "dense")
        return plan, decisions

    def sketch_seed(self, number: int) -> int:
        """Omega's public seed for round ``number``: the private release's too (``flora.common.omega``)."""
        return omega_round_seed(self.settings.seed, number)

    def _mask_step(self, request: MaskRequest, plan: RoundPlan, stage: int, downloads: dict[tuple[int, int], Payload],
                   index: int) -> sa.MaskStep:
        """Stage ``stage``'s step: the plan, and what client ``index`` fetches (its inbox in stage 1, Q in stage 2)."""
        version = request.round_id - 1 if plan.kept is not None else 0  # the kept LoRA the round started from
        step = sa.MaskStep(stage=stage, active=request.active, lengths=request.lengths, plan=sa.SecurePlan(
            clients=sorted(request.active), ranks=plan.ranks, scalings=plan.scalings, weights=plan.weights,
            clip_norm=plan.clip_norm or 0.0, sketch_seed=plan.seed, kept_version=version, fixed_point_bits=plan.bits))
        for name, kind in (("inbox", INBOX_KIND), ("sketch", SKETCH_KIND)):
            if (index, kind) in downloads:
                getattr(step, name).CopyFrom(downloads[index, kind][1])
        return step


def secure_summary(secure: dict) -> sa.SecureSummary:
    """A history line's "secure" record as Status's RoundSummary.secure."""
    return sa.SecureSummary(survivors=secure.get("survivors", 0), dropouts_recovered=secure.get("dropouts_recovered", 0),
                            bytes_up=sum(secure.get("bytes_up", {}).values()),
                            bytes_down=sum(secure.get("bytes_down", {}).values()),
                            seconds=sum(secure.get("seconds", {}).values()))


def _over_survivors(plan: RoundPlan, planned: Sequence[int], survivors: frozenset[int],
                    summed: np.ndarray) -> tuple[RoundPlan, np.ndarray]:
    """The plan restricted to the survivors, their weights renormalized, and the sum rescaled to
    match (re-encoded at the same scale: one more rounding of 2^-(f+1), far below float32's)."""
    if len(survivors) == len(planned):
        return plan, summed
    keep = [k for k, index in enumerate(planned) if index in survivors]
    total = math.fsum(plan.weights[k] for k in keep)
    over = replace(plan, ranks=tuple(plan.ranks[k] for k in keep), scalings=tuple(plan.scalings[k] for k in keep),
                   weights=tuple(plan.weights[k] / total for k in keep))
    return over, encode(decode(summed, plan.bits) / total, plan.bits)


def _label(task: sa.SecureTask) -> str:
    """A step's name in the history's per-stage counts: share, mask1, unmask1, mask2, ..."""
    kind = task.WhichOneof("step")
    return kind if kind == "share" else f"{kind}{getattr(task, kind).stage}"


def _keys(advert: AdvertiseKeys) -> sa.PublicKeys:
    return sa.PublicKeys(client=advert.client, channel_key=advert.channel_key, mask_keys=advert.mask_keys)
