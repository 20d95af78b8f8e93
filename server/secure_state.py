"""A secure-aggregation attempt on disk, so that a restarted server resumes it (issue 30).

The attempt's ``ServerRound`` holds only what the protocol lets the server hold: public keys,
ciphertexts it cannot open, the running sum of the open stage's masked inputs (with who
contributed to it), the reveals of the unmask step, and after pass 1 the sketch Q and the dense
modules' sums (sums of every survivor, never one client's). All of it is written here before the
server acts on it (a step is handed out, an answer acknowledged), each file through a temporary
file, fsync and rename, in these files per attempt under ``<state_dir>/secure/``:

    r000003-a1.json               the protocol state: keys, sealed shares, stage, the masked
                                  uploads accepted in the open MASK step (client and sha256), the
                                  unmask request and the reveals, the announced plan (JSON, bytes
                                  as hex)
    r000003-a1.s1-c4.masked       client 4's masked upload of stage 1 as received (uint64
                                  little-endian), kept while stage 1's MASK step is open
    r000003-a1.masked.safetensors the closed MASK step's masked sum (uint64) and its contributors
    r000003-a1.sketch.safetensors pass 1's Q and dense sums, and pass 1's survivors

An accepted masked upload costs one write of its own bytes (then an addition into the sum in
memory, and the small JSON that lists it); the running sum is written once, when the step
closes, and the uploads are deleted once the state that says so is saved. A restart in a MASK
step re-adds the listed uploads, each checked against its recorded sha256, and deletes any
other kept upload a crash left (one never listed, or a closed step's not yet deleted).

A restart rebuilds the ``ServerRound`` by replaying the keys, shares and reveals through its own
``receive_*`` checks, so a damaged file is refused as a hostile message would be (``Untrusted``),
and the unmask request it recomputes must be the one saved: a resumed attempt asks each holder
for the same kind of share it was asked for before the restart, never the other kind.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from flora.common.chunks import fsync_dir, write_atomic
from flora.common.secagg.errors import SecAggError
from flora.common.secagg.finish import Sketch
from flora.common.secagg.messages import (
    AdvertiseKeys, EncryptedShare, KeyBundle, MaskedInput, RevealedShare, ShareKeys, UnmaskResponse,
)
from flora.common.secagg.server import ServerRound
from flora.common.secagg.wire import keys_digest
from flora.server.layout import Layout
from flora.server.store import Submission
from flora.v1 import secagg_pb2 as sa

FORMAT = "flora-secagg-state/v1"


class Untrusted(Exception):
    """A saved attempt that cannot be resumed; the message says why."""


@dataclass(frozen=True)
class Identity:
    """Which attempt a file must belong to."""

    run_id: str
    number: int
    attempt: int
    ids: tuple[str, ...]  # the selected clients, sorted (a client's index is its position)
    seed: bytes


@dataclass
class Restored:
    """A saved attempt rebuilt: the protocol state and what its steps hand out again."""

    server: ServerRound
    uploads: dict[int, str]  # the open MASK step's accepted uploads (client -> sha256), re-added
    bundles: dict[int, KeyBundle]
    inboxes: dict[int, tuple[EncryptedShare, ...]]
    plan: dict[str, Any] | None  # the public plan announced with stage 1, as saved
    sketch: Sketch | None  # pass 1's result, when pass 2 is open or next
    survivors: frozenset[int] | None  # pass 1's survivors, with the sketch
    counters: dict[str, dict[str, float]]


class AttemptFiles:
    """The files of one attempt (blocking I/O: call the writers from a worker thread)."""

    def __init__(self, folder: Path, number: int, attempt: int) -> None:
        self.folder = folder
        self.stem = f"r{number:06d}-a{attempt}"
        self.state, self.masked, self.sketch = (folder / f"{self.stem}{suffix}" for suffix in
                                                (".json", ".masked.safetensors", ".sketch.safetensors"))

    def upload(self, stage: int, client: int) -> Path:
        """Where client ``client``'s accepted masked upload of ``stage`` is kept."""
        return self.folder / f"{self.stem}.s{stage}-c{client}.masked"

    def write_upload(self, stage: int, client: int, vectors: Sequence[np.ndarray]) -> None:
        """The upload's bytes as received (its vectors' uint64 entries, little-endian, in order)."""
        data = vectors[0] if len(vectors) == 1 else np.concatenate(vectors)
        write_atomic(self.upload(stage, client), memoryview(data.astype("<u8", copy=False)).cast("B"), 0o600)

    def remove_uploads(self, stage: int) -> None:
        """Delete ``stage``'s kept uploads (its sum is saved: they are no longer needed)."""
        for path in self.folder.glob(f"{self.stem}.s{stage}-c*.masked"):
            path.unlink(missing_ok=True)

    def remove_unlisted(self, stage: int, listed: Collection[int]) -> None:
        """At a resume: delete every kept upload the saved state does not list (``listed``: the
        open MASK step's clients), and the temporary files of writes a crash interrupted."""
        keep = {self.upload(stage, c) for c in listed}
        for path in [*self.folder.glob(f"{self.stem}.s*-c*.masked"), *self.folder.glob(f".{self.stem}.s*-c*.masked.*.tmp")]:
            if path not in keep:
                path.unlink(missing_ok=True)

    def write_state(self, document: bytes) -> None:
        if not self.folder.exists():  # the first write of a state directory's first secure round
            self.folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.folder.parent)
        write_atomic(self.state, document, 0o600)

    def write_masked(self, identity: Identity, stage: int, sums: Sequence[np.ndarray], contributors: Sequence[int]) -> None:
        meta = _header(identity) | {"stage": str(stage), "contributors": json.dumps(sorted(contributors))}
        write_atomic(self.masked, save_arrays({f"sum.{j}": s for j, s in enumerate(sums)}, meta), 0o600)

    def write_sketch(self, identity: Identity, sketch: Sketch, survivors: frozenset[int]) -> None:
        tensors = {f"q.{n}": t.contiguous() for n, t in sketch.q.items()} | {f"dense.{n}": t.contiguous()
                                                                            for n, t in sketch.dense.items()}
        meta = _header(identity) | {"survivors": json.dumps(sorted(survivors))}
        write_atomic(self.sketch, save_tensors(tensors, meta), 0o600)


def remove_others(folder: Path, keep: AttemptFiles) -> None:
    """Delete every saved attempt but ``keep``'s (a new attempt makes the older ones useless)."""
    if folder.is_dir():
        for path in folder.iterdir():
            if not path.name.startswith(f"{keep.stem}."):
                path.unlink(missing_ok=True)


def stored_adverts(layout: Layout, identity: Identity, submissions: Sequence[Submission],
                   held: Collection[int]) -> list[AdvertiseKeys]:
    """The attempt's advertisements not ``held`` in memory, as the coordinator stored them (each
    submission's key file, written before it was acknowledged), checked against the recorded
    digest (blocking: a thread)."""
    adverts = []
    for s in submissions:
        if s.client_id in identity.ids and identity.ids.index(s.client_id) in held:
            continue
        try:
            keys = sa.PublicKeys.FromString(layout.absolute(s.path).read_bytes())
        except (OSError, ValueError, DecodeError) as error:
            raise SecAggError("keys", f"client {s.client_id}'s stored keys cannot be read ({error})") from None
        if s.client_id not in identity.ids or keys.client != identity.ids.index(s.client_id) \
                or keys_digest(keys.channel_key, keys.mask_keys) != s.sha256:
            raise SecAggError("keys", f"client {s.client_id}'s stored keys are not the ones it advertised")
        adverts.append(AdvertiseKeys(keys.client, identity.number, keys.channel_key, tuple(keys.mask_keys)))
    return adverts


def _header(identity: Identity) -> dict[str, str]:
    return {"format": FORMAT, "run_id": identity.run_id, "round": str(identity.number),
            "attempt": str(identity.attempt), "ids": json.dumps(list(identity.ids)), "seed": identity.seed.hex()}


# --- the protocol state as JSON --------------------------------------------------------------------


def encode_state(identity: Identity, server: ServerRound, plan: dict[str, Any] | None,
                 counters: dict[str, dict[str, float]], uploads: dict[int, str] | None = None) -> bytes:
    """The ``ServerRound``'s state but the masked uploads and sum (their own files): nothing a
    client sent in clear. ``uploads``: the open MASK step's accepted uploads, client -> sha256."""
    request = server.request
    return json.dumps({
        **_header(identity), "stages": server.stages, "threshold": server.threshold, "degree": server.degree,
        "phase": server.phase, "stage": server.stage, "active": sorted(server.active), "lengths": list(server.lengths),
        "uploads": sorted([c, d] for c, d in (uploads or {}).items()),
        "adverts": [[a.client, a.channel_key.hex(), [k.hex() for k in a.mask_keys]] for a in server.adverts.values()],
        "sealed": [[s.sender, [[e.receiver, e.ciphertext.hex()] for e in s.shares]] for s in server.sealed.values()],
        "request": None if request is None else [request.stage, list(request.survivors), list(request.dropped)],
        "reveals": [[r.sender, r.stage, _pairs(r.self_shares), _pairs(r.key_shares)] for r in server.reveals.values()],
        "plan": plan, "counters": counters,
    }).encode()


def _pairs(reveals: Sequence[RevealedShare]) -> list[list]:
    return [[r.owner, r.share.hex()] for r in reveals]


def _revealed(pairs: Sequence[Sequence]) -> tuple[RevealedShare, ...]:
    return tuple(RevealedShare(int(owner), bytes.fromhex(share)) for owner, share in pairs)


def load(files: AttemptFiles, identity: Identity) -> Restored | None:
    """The attempt as saved, None when nothing was saved; ``Untrusted`` saying why it cannot be resumed."""
    if not files.state.exists():
        return None
    try:
        doc = json.loads(files.state.read_bytes())
        _check_header(doc, identity, files.state.name)
        return _replay(doc, files, identity)
    except Untrusted:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, SecAggError) as error:  # SecAggError: a refused replay
        raise Untrusted(f"{files.state.name} is damaged ({type(error).__name__}: {error})") from None


def _check_header(doc: dict[str, Any], identity: Identity, name: str) -> None:
    expected = _header(identity)
    for key, want in expected.items():
        if str(doc.get(key)) != want:
            raise Untrusted(f"{name} belongs to another {'run' if key == 'run_id' else 'attempt'} ({key} differs)")


def _replay(doc: dict[str, Any], files: AttemptFiles, identity: Identity) -> Restored:
    """Rebuild the ``ServerRound`` through its own checks, up to the phase and stage saved."""
    number, phase, stage = identity.number, doc["phase"], int(doc["stage"])
    server = ServerRound(number, identity.seed, range(len(identity.ids)), int(doc["stages"]), int(doc["threshold"]),
                         doc["degree"])
    for client, channel, masks in doc["adverts"]:
        server.receive_keys(AdvertiseKeys(int(client), number, bytes.fromhex(channel), tuple(bytes.fromhex(k) for k in masks)))
    restored = Restored(server, {}, {}, {}, doc.get("plan"), None, None, doc.get("counters") or {})
    if phase == "advertise":
        return restored
    restored.bundles = server.close_keys()
    for sender, shares in doc["sealed"]:
        server.receive_shares(ShareKeys(int(sender), number, tuple(
            EncryptedShare(int(sender), int(receiver), number, bytes.fromhex(c)) for receiver, c in shares)))
    if phase == "share":
        return restored
    restored.inboxes = server.close_shares()
    if phase not in ("open", "mask", "unmask") or not 0 <= stage <= server.stages:
        raise Untrusted(f"{files.state.name}: phase {phase!r} at stage {stage} is not one a round is saved at")
    if stage >= (1 if phase == "open" else 2):  # pass 2 is open or next: pass 1's sketch must be there
        restored.sketch, restored.survivors = _load_sketch(files, identity)
    active = frozenset(int(c) for c in doc["active"])
    if not active <= server.active or (stage + (phase == "open") <= 1 and active != server.active):
        raise Untrusted(f"{files.state.name}: the active clients are not the ones that shared their keys")
    server.active = active
    if phase == "open":
        server.stage = stage
        return restored
    server.stage = stage - 1
    server.open_stage(stage, [int(n) for n in doc["lengths"]])
    if phase == "mask":
        restored.uploads = _readd_uploads(files, server, doc["uploads"])
        return restored
    _load_masked(files, identity, server)
    request = server.close_masked()
    if doc["request"] != [request.stage, list(request.survivors), list(request.dropped)]:
        raise Untrusted(f"{files.state.name}: the saved unmask request is not the one the saved masked sum gives")
    for sender, reveal_stage, self_shares, key_shares in doc["reveals"]:
        server.receive_unmask(UnmaskResponse(int(sender), number, int(reveal_stage), _revealed(self_shares),
                                             _revealed(key_shares)))
    return restored


def _readd_uploads(files: AttemptFiles, server: ServerRound, listed: Sequence[Sequence]) -> dict[int, str]:
    """The open MASK step's accepted uploads added again through the protocol's own checks, each
    file held to the sha256 recorded when it was accepted."""
    uploads = {}
    for client, digest in listed:
        path = files.upload(server.stage, int(client))
        data = path.read_bytes() if path.exists() else b""
        if hashlib.sha256(data).hexdigest() != digest or len(data) != 8 * sum(server.lengths):
            raise Untrusted(f"{path.name} is missing or not the upload accepted from client {client}")
        vectors = np.split(np.frombuffer(data, dtype="<u8").astype(np.uint64), np.cumsum(server.lengths)[:-1])
        server.receive_masked(MaskedInput(int(client), server.round_id, server.stage, tuple(vectors)))
        uploads[int(client)] = digest
    return uploads


def _load_masked(files: AttemptFiles, identity: Identity, server: ServerRound) -> None:
    """The closed MASK step's sum; none saved for this stage means no masked input was acknowledged."""
    if not files.masked.exists():
        return
    data = files.masked.read_bytes()
    meta = _metadata(data, files.masked.name, identity)
    if int(meta["stage"]) != server.stage:
        return  # an earlier stage's sum: nothing of this stage was acknowledged
    arrays = load_arrays(data)
    sums = [arrays[f"sum.{j}"] for j in range(len(server.lengths))]
    contributors = set(json.loads(meta["contributors"]))
    if any(s.dtype != np.uint64 or s.shape != (n,) for s, n in zip(sums, server.lengths)) or not contributors <= server.active:
        raise Untrusted(f"{files.masked.name} does not fit stage {server.stage} (lengths or contributors)")
    server.masked_sum, server.masked_from = [np.array(s) for s in sums], contributors


def _load_sketch(files: AttemptFiles, identity: Identity) -> tuple[Sketch, frozenset[int]]:
    if not files.sketch.exists():
        raise Untrusted(f"{files.sketch.name} is missing: pass 2 cannot be resumed without pass 1's Q")
    data = files.sketch.read_bytes()
    meta = _metadata(data, files.sketch.name, identity)
    tensors = load_tensors(data)
    q = {n[2:]: t for n, t in tensors.items() if n.startswith("q.")}
    dense = {n[6:]: t for n, t in tensors.items() if n.startswith("dense.")}
    return Sketch(q, dense), frozenset(int(c) for c in json.loads(meta["survivors"]))


def _metadata(data: bytes, name: str, identity: Identity) -> dict[str, str]:
    """A safetensors file's metadata, refused unless it is this attempt's."""
    length = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + length]).get("__metadata__") or {}
    _check_header(meta, identity, name)
    return meta


# --- writes that acknowledgements wait for ----------------------------------------------------------


class GroupCommit:
    """Durable writes that callers await, one at a time, each covering every change before it.

    ``flush`` is called after a change in memory: it returns once a write taken after that
    change is on disk. ``snapshot`` runs on the event loop (a consistent copy, since nothing else
    runs meanwhile) and returns the blocking write, which runs in a thread; changes made while a
    write is in flight are covered by the next one, so N concurrent answers cost at most two
    writes, not N.
    """

    def __init__(self, snapshot: Callable[[], Callable[[], None]]) -> None:
        self._snapshot = snapshot
        self._lock = asyncio.Lock()
        self._changes = 0
        self._written = 0

    async def flush(self) -> None:
        self._changes += 1
        wanted = self._changes
        async with self._lock:
            if self._written >= wanted:
                return
            taken, write = self._changes, self._snapshot()
            await asyncio.to_thread(write)
            self._written = taken


def plan_record(plan: Any) -> dict[str, Any]:
    """The public facts a plan announces with stage 1 (compared with the recomputed plan at a resume)."""
    return {"ranks": list(plan.ranks), "scalings": [float(s) for s in plan.scalings],
            "weights": [float(w) for w in plan.weights], "clip_norm": plan.clip_norm and float(plan.clip_norm), "seed": int(plan.seed),
            "bits": int(plan.bits)}



class SavedAttempt:
    """What one attempt writes and when: its state, each accepted masked upload, a closed MASK
    step's sum, pass 1's sketch.

    ``server``, ``counters`` and ``uploads`` are read at each snapshot (the attempt's live objects).
    """

    def __init__(self, folder: Path, identity: Identity, server: Callable[[], ServerRound],
                 counters: Callable[[], dict[str, dict[str, float]]], uploads: Callable[[], dict[int, str]]) -> None:
        self.identity, self.files = identity, AttemptFiles(folder, identity.number, identity.attempt)
        self._server, self._counters, self._uploads = server, counters, uploads
        self.plan: dict[str, Any] | None = None
        self.state = GroupCommit(self._state_write)
        self.masked = GroupCommit(self._masked_write)

    def _state_write(self) -> Callable[[], None]:
        document = encode_state(self.identity, self._server(), self.plan, self._counters(), self._uploads())
        return lambda: self.files.write_state(document)

    def _masked_write(self) -> Callable[[], None]:
        server = self._server()
        sums, contributors, stage = [s.copy() for s in server.masked_sum], sorted(server.masked_from), server.stage
        return lambda: self.files.write_masked(self.identity, stage, sums, contributors)

    async def save_upload(self, stage: int, client: int, vectors: Sequence[np.ndarray]) -> None:
        """A masked upload as received, before it is added to the sum (blocking write in a thread)."""
        await asyncio.to_thread(self.files.write_upload, stage, client, vectors)

    async def forget_upload(self, stage: int, client: int) -> None:
        """A kept upload that was not counted after all (its step closed while it was written)."""
        await asyncio.to_thread(self.files.upload(stage, client).unlink, missing_ok=True)

    async def drop_uploads(self, stage: int) -> None:
        """``stage``'s uploads, once its sum and the state past its MASK step are saved."""
        await asyncio.to_thread(self.files.remove_uploads, stage)

    async def save_sketch(self, sketch: Sketch, survivors: frozenset[int]) -> None:
        """Pass 1's result, before the state that says pass 2 is open (once recorded as released under DP)."""
        await asyncio.to_thread(self.files.write_sketch, self.identity, sketch, survivors)

    def announce(self, plan: Any) -> None:
        """Keep the plan's public facts; after a restart, refuse a recomputed plan that differs
        from the one the clients were given (a changed setting would make their vectors disagree)."""
        record = plan_record(plan)
        if self.plan is not None and record != self.plan:
            raise SecAggError("plan", "the recomputed plan differs from the one announced before the restart "
                                      "(a round setting changed?): the attempt starts over")
        self.plan = record
