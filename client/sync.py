"""Bringing the local model to the version a round requires, from verified downloads only.

Every run: the downlink updates of versions held+1 .. required are downloaded (each resumed from
its ``.part`` after an interruption), their sha256 verified by the receiver, validated against the
run's module shapes, and merged in float32 in version order (W <- W + b a for a module sent as
canonical factors, W <- W + D for one sent dense). When the client is far behind, or the server's
merged modules are smaller than the updates it lacks, the server answers with those merged
modules instead and the client takes them as they are (catch-up without replay). Either way the
new weights are built on a copy of the target modules' weights, so that the model moves from one
version to the next as a whole or not at all, and persisted before the version pointer moves. A
quantized base holds the cumulative update beside its weights instead (``flora.client.local_weights``):
the same updates, folded into that sum, and never merged modules.

Methods that warm-start (fedex, flora-warm, ffa, fedit, ...) also download the global LoRA the
server keeps at the task's version; what the client trains from it is the method's ``start``
(``flora.common.methods``), the same pure function the server computes each client's start with.
Nothing of it is merged: the model moves by global updates only, as the server's does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
from torch import Tensor, nn

from flora.client.connection import Connection, rpc_code, rpc_details
from flora.client.local_weights import LocalWeights, as_local
from flora.client.progress import Bar, Progress
from flora.client.state import StateDir
from flora.common.chunks import ChunkError
from flora.common.lora import LoraAdapter
from flora.common.payload import PayloadError, PayloadLimits, PayloadMeta, read_adapter, read_update, read_weights
from flora.common.update import GlobalUpdate, ModuleUpdate, is_factors
from flora.common.wire import ArtifactReceiver, part_path, resume_offset
from flora.v1 import coordinator_pb2, run_pb2, transfer_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")

UPDATE = transfer_pb2.ARTIFACT_KIND_GLOBAL_UPDATE
LORA = transfer_pb2.ARTIFACT_KIND_GLOBAL_LORA
MERGED = transfer_pb2.ARTIFACT_KIND_MERGED_MODULES
_PAYLOAD_KINDS = {UPDATE: "global_update", LORA: "global_lora", MERGED: "merged_modules"}
# A download whose bytes fail verification this many times in a row is not a network hiccup.
MAX_CORRUPT_DOWNLOADS = 3


class SyncError(RuntimeError):
    """The server's artifacts cannot bring the model to the required version."""


def expected_shapes(spec: run_pb2.RunSpec) -> dict[str, tuple[int, int]]:
    """The run's target modules and their (out_features, in_features): what payloads must hold."""
    return {m.name: (m.out_features, m.in_features) for m in spec.target_modules}


def restore(model: nn.Module | LocalWeights, state: StateDir, spec: run_pb2.RunSpec) -> int:
    """Put the saved state of the held version (merged weights, or the held cumulative update of a
    quantized base) into a freshly loaded base model.

    Returns the version the model now holds; no download and no merge is needed for it.
    """
    local = as_local(model, expected_shapes(spec))
    version = state.held_version(spec.run_id, local.form)
    if version:
        local.restore(state.load_saved(version, expected_shapes(spec), local.form))
        log.info("event=restored version=%d form=%s", version, local.form)
    return version


def _checked(what: str, merge: Callable[[], None]) -> None:
    """Run a merge; a payload that does not fit the model becomes a SyncError naming it."""
    try:
        merge()
    except (KeyError, ValueError) as exc:
        raise SyncError(f"{what} cannot be merged: {exc}") from None


class Synchroniser:
    """Downloads and applies one run's global artifacts for one model."""

    def __init__(
        self, conn: Connection, state: StateDir, spec: run_pb2.RunSpec, progress: Progress,
        limits: PayloadLimits = PayloadLimits(),
    ) -> None:
        self._conn, self._state, self._spec, self._progress, self._limits = conn, state, spec, progress, limits
        self._shapes = expected_shapes(spec)

    # --- flora ----------------------------------------------------------------------------------

    def catch_up(self, model: nn.Module | LocalWeights, held: int, required: int) -> int:
        """Bring ``model`` from version ``held`` to ``required`` and persist; returns required.

        A quantized base (``takes_merged`` false) never asks for merged modules: it replays updates.
        """
        if required < held:
            raise SyncError(f"the model holds version {held} but the server's latest version is {required}")
        if required == held:
            return held
        local = as_local(model, self._shapes)
        merged = self._state.artifact_path(MERGED, required)
        updates = [self._state.artifact_path(UPDATE, v) for v in range(held + 1, required + 1)]
        use_merged = lambda: local.takes_merged and merged.exists()  # noqa: E731
        self._verified(lambda: use_merged() or all(p.exists() for p in updates), [merged, *updates],
                       lambda: self._fetch_catch_up(held, required, local.takes_merged), f"versions {held + 1}..{required}")
        if use_merged():
            local.replace(self._read_merged(required))
            log.info("event=caught_up version=%d from=%d via=merged_modules", required, held)
        else:
            _checked(f"global updates v{held + 1}..v{required}", lambda: local.apply(self._updates(held, required)))
        self._state.commit(self._spec.run_id, required, local.export(), local.form)
        return required

    def _updates(self, held: int, required: int) -> Iterator[GlobalUpdate]:
        """The validated updates of versions held+1..required, read one at a time as they are applied."""
        for version in range(held + 1, required + 1):
            update = self._read_update(version)
            ranks = [part.a.shape[0] for part in update.values() if is_factors(part)]
            log.info("event=merged artifact='global update v%d' factor_modules=%d dense_modules=%d max_rank=%s",
                     version, len(ranks), len(update) - len(ranks), max(ranks, default="-"))
            yield update

    def _fetch_catch_up(self, held: int, required: int, allow_merged: bool = True) -> None:
        """One FetchGlobal attempt: resume merged modules already begun, else the updates not on disk."""
        merged = self._state.artifact_path(MERGED, required)
        if allow_merged and part_path(merged).exists():
            try:
                self._fetch(MERGED, required, required, resume_offset(merged))
            except grpc.RpcError as exc:
                if rpc_code(exc) != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                # No longer the latest version: its merged modules are gone; replay the updates.
                log.info("event=download_restart reason=%r", rpc_details(exc))
                part_path(merged).unlink(missing_ok=True)
            return
        start = next(v for v in range(held + 1, required + 1) if not self._state.artifact_path(UPDATE, v).exists())
        self._fetch(UPDATE, start, required, resume_offset(self._state.artifact_path(UPDATE, start)), allow_merged=allow_merged)

    # --- warm starts ------------------------------------------------------------------------------

    def global_lora(self, version: int) -> LoraAdapter:
        """The global LoRA the server keeps at ``version``: what a warm-started round starts from."""
        self.download(LORA, version, version)
        adapter = self._read(LORA, version)
        if self._spec.global_lora_rank and adapter.rank != self._spec.global_lora_rank:
            raise SyncError(f"global LoRA v{version} has rank {adapter.rank}, the run's is {self._spec.global_lora_rank}")
        self._state.prune_globals(below=version)
        return adapter

    # --- downloads ------------------------------------------------------------------------------

    def download(self, kind: int, first: int, last: int) -> list[Path]:
        """Make sure the verified artifacts of versions first..last are on disk; return their paths."""
        paths = [self._state.artifact_path(kind, v) for v in range(first, last + 1)]

        def attempt() -> None:
            start = next(v for v in range(first, last + 1) if not self._state.artifact_path(kind, v).exists())
            self._fetch(kind, start, last, resume_offset(self._state.artifact_path(kind, start)))

        self._verified(lambda: all(p.exists() for p in paths), paths, attempt, f"versions {first}..{last}")
        return paths

    def _verified(self, done: Callable[[], bool], paths: list[Path], attempt: Callable[[], None], what: str) -> None:
        """Run FetchGlobal ``attempt``s until ``done()``.

        Transient failures are retried with backoff and resume at the ``.part`` file's size; a
        download whose bytes fail verification is discarded and fetched again from the start.
        """
        corrupt = 0
        while not done():
            try:
                self._conn.retrying("FetchGlobal", attempt)
            except ChunkError as exc:  # includes WireError: the bytes are not what was announced
                corrupt += 1
                log.warning("event=download_rejected attempt=%d reason=%r", corrupt, str(exc))
                for path in paths:
                    part_path(path).unlink(missing_ok=True)
                if corrupt >= MAX_CORRUPT_DOWNLOADS:
                    raise SyncError(f"download of {what} failed verification {corrupt} times: {exc}") from None

    def _fetch(self, kind: int, start: int, last: int, offset: int, allow_merged: bool = False) -> None:
        """One FetchGlobal call for versions start..last of ``kind`` (or, when allowed, the merged modules)."""
        request = coordinator_pb2.FetchGlobalRequest(
            kind=kind, from_version=start - 1 if kind == UPDATE else start, to_version=last, offset=offset,
            allow_merged=allow_merged,
        )
        log.info("event=download kind=%s from=%d to=%d offset=%d", _PAYLOAD_KINDS[kind], start, last, offset)
        bar: Bar | None = None
        bar_version: int | None = None
        try:
            with ArtifactReceiver(self._state.artifact_path, self._limits.max_bytes) as receiver:
                for chunk in self._conn.stream_out("FetchGlobal", request):
                    if chunk.version != bar_version:
                        bar, bar_version = self._next_bar(bar, chunk), chunk.version
                    receiver.feed(chunk)
                    bar.update(len(chunk.data))
                artifacts = receiver.finish()
        finally:
            if bar is not None:
                bar.close()
        got = [(a.kind, a.version) for a in artifacts]
        expected = [(kind, v) for v in range(start, last + 1)]
        if got != expected and not (allow_merged and got == [(MERGED, last)]):
            raise SyncError(f"asked for {_PAYLOAD_KINDS[kind]} versions {start}..{last}, the server sent {got}")

    def _next_bar(self, bar: Bar | None, chunk: transfer_pb2.Chunk) -> Bar:
        if bar is not None:
            bar.close()
        bar = self._progress.bar(f"download v{chunk.version}", chunk.total_bytes, unit="B")
        bar.update(chunk.offset)
        return bar

    def _read(self, kind: int, version: int) -> LoraAdapter:
        """Validate a downloaded global LoRA against the run's shapes and load it."""
        return self._validated(kind, version, lambda path: read_adapter(path, self._shapes, limits=self._limits))

    def _read_update(self, version: int) -> dict[str, ModuleUpdate]:
        """Validate a downloaded downlink update against the run's shapes and load it."""
        return self._validated(UPDATE, version, lambda path: read_update(path, self._shapes, limits=self._limits))

    def _read_merged(self, version: int) -> dict[str, Tensor]:
        """Validate downloaded merged modules against the run's shapes and load them."""
        return self._validated(MERGED, version, lambda path: read_weights(path, self._shapes, limits=self._limits))

    def _validated(self, kind: int, version: int, read: Callable[[Path], tuple[T, PayloadMeta]]) -> T:
        """``read`` a verified download; a payload that is still unusable is deleted, never reused."""
        path = self._state.artifact_path(kind, version)
        try:
            loaded, meta = read(path)
        except PayloadError as exc:
            path.unlink(missing_ok=True)
            raise SyncError(f"{_PAYLOAD_KINDS[kind]} v{version}: {exc}") from None
        if meta.kind != _PAYLOAD_KINDS[kind] or meta.version not in (None, version):
            path.unlink(missing_ok=True)
            raise SyncError(f"{path.name}: metadata says {meta.kind} v{meta.version}, expected {_PAYLOAD_KINDS[kind]} v{version}")
        return loaded
