"""Secure aggregation on the client: after training, keys instead of an upload, then the steps.

A secure run (RunSpec.secure_aggregation) never uploads a client's LoRA factors. After training
the client keeps its update in memory, draws the round's keys (``ClientRound``) and calls
AdvertiseKeys with the claims a SubmitUpdate header would carry. Once the round closes, NextTask
hands out one step at a time (protos/flora/v1/secagg.proto): SHARE (seal this client's shares
to its neighbours), MASK (fetch the step's inbox or Q over FetchSecure, sized by the plan first;
clip and weight the change by the announced plan, project it, encode it in fixed point, mask it:
``flora.common.secagg.contribution``; stream it up with SubmitMasked) and UNMASK (reveal the
shares the server asks for; the crypto layer refuses a request that would reveal both secrets
of one client). A step for another round, or after a restart that lost the session, is
answered with nothing: the server's deadline then counts this client as dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from flora.client.connection import Connection
from flora.common.chunks import DEFAULT_CHUNK_SIZE
from flora.common.lora import LoraAdapter
from flora.common.methods import AggregationMethod
from flora.common.secagg.client import ClientRound
from flora.common.secagg.contribution import ClientChange, client_change, client_contribution
from flora.common.secagg.messages import AdvertiseKeys, KeyBundle, MaskRequest, UnmaskRequest
from flora.common.secagg.plan import RoundPlan, plan_round, sketch_bases
from flora.common.secagg.stream import Download, masked_messages
from flora.common.secagg.wire import inbox_size, keys_digest, read_inbox, read_sketch, sketch_size
from flora.v1 import run_pb2, secagg_pb2 as sa, transfer_pb2

log = logging.getLogger(__name__)


@dataclass
class SecureSession:
    """One round's secrets and trained update, held in memory only until the round ends."""

    round: int
    protocol: ClientRound
    update: LoraAdapter  # every run module, at the client's rank and scaling
    kept: LoraAdapter | None  # the global LoRA the round started from (warm methods, ffa)
    method: AggregationMethod
    shapes: dict[str, tuple[int, int]]
    chunk_size: int = DEFAULT_CHUNK_SIZE  # RunSpec.chunk_size: the largest piece of an upload
    dp_clip_norm: float | None = None  # RunSpec.dp_clip_norm: under DP the client clips to it too
    dp_dense: bool = False  # RunSpec.dp_release == "dense": every module in one dense pass
    neighbours: frozenset[int] = frozenset()  # this client's neighbours in the round's graph (the SHARE step's)
    plan: RoundPlan | None = None
    change: ClientChange | None = None
    bases: dict[str, torch.Tensor] = field(default_factory=dict)
    masked: tuple[int, tuple[np.ndarray, ...]] = (0, ())  # the last stage masked and its vectors


def advertise(conn: Connection, spec: run_pb2.RunSpec, info: sa.SecureRound, header: transfer_pb2.UpdateHeader,
              update: LoraAdapter, kept: LoraAdapter | None, method: AggregationMethod) -> SecureSession:
    """Draw the round's keys and send them with the claims; the session the steps then use."""
    protocol = ClientRound(info.client_index, header.round, info.round_seed, info.stages, info.threshold, info.degree)
    advert = protocol.advertise()
    keys = sa.PublicKeys(client=advert.client, channel_key=advert.channel_key, mask_keys=advert.mask_keys)
    claims = transfer_pb2.UpdateHeader()
    claims.CopyFrom(header)
    claims.total_bytes, claims.sha256 = 0, keys_digest(keys.channel_key, keys.mask_keys)
    reply = conn.call("AdvertiseKeys", sa.AdvertiseKeysRequest(claims=claims, keys=keys))
    log.info("event=advertised round=%d index=%d message=%r", header.round, info.client_index, reply.message)
    shapes = {m.name: (m.out_features, m.in_features) for m in spec.target_modules}
    return SecureSession(header.round, protocol, update, kept, method, shapes, spec.chunk_size or DEFAULT_CHUNK_SIZE,
                         spec.dp_clip_norm or None, spec.dp_release == "dense")


def step_label(task: sa.SecureTask) -> str:
    """A step's name in logs: share, mask1, unmask1, mask2, ..."""
    kind = task.WhichOneof("step")
    if kind is None:
        return "unknown"
    return kind if kind == "share" else f"{kind}{getattr(task, kind).stage}"


def handle(conn: Connection, session: SecureSession | None, task: sa.SecureTask) -> bool:
    """Do the step ``task`` asks for, if this client holds the round's session (False when not)."""
    kind = task.WhichOneof("step")
    if session is None or session.round != task.round:
        log.warning("event=secure_step_skipped round=%d step=%s reason=no_session", task.round, kind)
        return False
    if kind == "share":
        _share(conn, session, task.share)
    elif kind == "mask":
        _mask(conn, session, task.mask)
    elif kind == "unmask":
        _unmask(conn, session, task.unmask)
    else:
        raise ValueError(f"secure_aggregation: round {task.round}'s SecureTask has no step this client knows")
    log.info("event=secure_step round=%d step=%s", task.round, kind)
    return True


def _share(conn: Connection, session: SecureSession, step: sa.ShareStep) -> None:
    neighbours = tuple(AdvertiseKeys(k.client, session.round, k.channel_key, tuple(k.mask_keys)) for k in step.neighbours)
    sealed = session.protocol.share_keys(KeyBundle(session.round, tuple(step.participants), neighbours))
    shares = [sa.SealedShare(sender=s.sender, receiver=s.receiver, ciphertext=s.ciphertext) for s in sealed.shares]
    session.neighbours = frozenset(k.client for k in step.neighbours)
    conn.call("ShareKeys", sa.ShareKeysRequest(round=session.round, shares=shares))


def _plan(session: SecureSession, announced: sa.SecurePlan) -> tuple[RoundPlan, int]:
    """The round's plan as every participant computes it from the announced public facts, and
    this client's place in it; refused when the announced scale differs from the computed one."""
    plan = plan_round(session.method, session.kept, session.shapes, list(announced.ranks), list(announced.scalings),
                      list(announced.weights), announced.clip_norm or None, announced.sketch_seed,
                      dp_clip_norm=session.dp_clip_norm, dense=session.dp_dense)
    if plan.bits != announced.fixed_point_bits:
        raise ValueError(f"secure_aggregation: the announced fixed-point scale 2^{announced.fixed_point_bits} is not "
                         f"the plan's 2^{plan.bits}")
    return plan, list(announced.clients).index(session.protocol.client)


def _mask(conn: Connection, session: SecureSession, step: sa.MaskStep) -> None:
    """Mask the stage's vector once; a step asked for again (its upload failed) sends the same bytes."""
    if session.masked[0] != step.stage:
        session.masked = (step.stage, _masked(conn, session, step))
    conn.retrying("SubmitMasked", lambda: conn.stream_in("SubmitMasked", masked_messages(
        session.round, step.stage, session.masked[1], session.chunk_size)))


def _masked(conn: Connection, session: SecureSession, step: sa.MaskStep) -> tuple[np.ndarray, ...]:
    """The stage's masked vectors from the announced plan and what the step fetches (inbox, Q)."""
    if step.stage == 1:
        session.plan, index = _plan(session, step.plan)
        session.change = client_change(session.plan, index, session.update)
        session.bases = sketch_bases(session.plan)
        senders = len(session.neighbours & set(step.active))
        inbox = _fetch(conn, session, step, step.inbox, inbox_size(senders, session.protocol.stages))
        session.protocol.receive_shares(read_inbox(inbox, session.protocol.client, session.round, session.protocol.stages))
    else:
        session.bases = read_sketch(session.plan, _fetch(conn, session, step, step.sketch, sketch_size(session.plan)))
    vector = np.concatenate(client_contribution(session.plan, step.stage, session.change, session.bases))
    request = MaskRequest(session.round, step.stage, tuple(step.active), tuple(step.lengths))
    return session.protocol.mask(request, [vector]).vectors


def _fetch(conn: Connection, session: SecureSession, step: sa.MaskStep, announced: sa.StepDownload,
           expected: int) -> bytearray:
    """A payload of the MASK step over FetchSecure: refused unless the step announced the ``expected``
    size (what the plan implies), resumed at the bytes held after a transient failure."""
    download = Download(announced, expected, session.round, step.stage)

    def attempt() -> bytearray:
        for chunk in conn.stream_out("FetchSecure", download.request()):
            download.feed(chunk)
        return download.finish()

    return conn.retrying("FetchSecure", attempt)


def _unmask(conn: Connection, session: SecureSession, step: sa.UnmaskStep) -> None:
    response = session.protocol.unmask(UnmaskRequest(session.round, step.stage, tuple(step.survivors), tuple(step.dropped)))
    conn.call("Unmask", sa.UnmaskRequest(round=session.round, stage=step.stage, self_shares=_revealed(response.self_shares),
                                         key_shares=_revealed(response.key_shares)))


def _revealed(items: Sequence) -> list[sa.RevealedShare]:
    return [sa.RevealedShare(owner=r.owner, share=r.share) for r in items]
