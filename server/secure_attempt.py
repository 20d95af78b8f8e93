"""One secure-aggregation attempt as the server holds it: the protocol state, the step each
client is asked to do now, what the steps hand out again after a restart, and the counters of
the history's "secure" record. ``secure_round`` drives it; ``secure_state`` saves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from flora.common.secagg.finish import Sketch
from flora.common.secagg.messages import EncryptedShare, KeyBundle
from flora.common.secagg.server import ServerRound
from flora.server.errors import FailedPrecondition
from flora.server.secure_state import GroupCommit, Identity, SavedAttempt, Untrusted, load, remove_others
from flora.server.secure_transfer import Payload
from flora.v1 import secagg_pb2 as sa

log = logging.getLogger(__name__)


@dataclass
class Attempt:
    """One round attempt's protocol state and the step each client is asked to do now."""

    number: int
    attempt: int
    ids: tuple[str, ...]  # the selected clients, sorted: a client's index is its position
    seed: bytes
    server: ServerRound
    saved: SavedAttempt
    steps: dict[int, sa.SecureTask] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    bytes_up: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_down: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    bundles: dict[int, KeyBundle] = field(default_factory=dict)  # SHARE's content, from close_keys
    inboxes: dict[int, tuple[EncryptedShare, ...]] = field(default_factory=dict)  # stage 1's, from close_shares
    sketch: Sketch | None = None  # pass 1's result, and its survivors
    survivors: frozenset[int] | None = None
    resumed: asyncio.Event = field(default_factory=asyncio.Event)  # set while the current step is handed out
    downloads: dict[tuple[int, int], Payload] = field(default_factory=dict)  # the open MASK step's, by (index, kind)
    streams: set[int] = field(default_factory=set)  # clients with a SubmitMasked stream in progress
    uploads: dict[int, str] = field(default_factory=dict)  # the open MASK step's kept uploads: client -> sha256
    gone: set[int] = field(default_factory=set)  # clients known gone (left, removed, joined again): asked nothing more

    @classmethod
    def fresh(cls, folder: Path, identity: Identity, server: ServerRound) -> Attempt:
        """A new attempt; the files of every other attempt go (nothing can resume them any more)."""
        saved = SavedAttempt(folder, identity, lambda: att.server, lambda: att.counters(), lambda: att.uploads)
        att = cls(identity.number, identity.attempt, identity.ids, identity.seed, server, saved)
        att.resumed.set()
        remove_others(folder, saved.files)
        return att

    def resume(self) -> bool:
        """At start, before serving: take up this attempt as saved (nothing saved: no step was handed
        out, and its advertisements are the stored submissions); False when it cannot be trusted."""
        try:
            restored = load(self.saved.files, self.saved.identity)
        except Untrusted as why:
            log.warning("round %d attempt %d: the saved secure-aggregation state cannot be trusted (%s); the attempt "
                        "starts over with fresh keys", self.number, self.attempt, why)
            return False
        if restored is None:
            log.info("round %d attempt %d: no secure step was handed out before the restart; the attempt goes on from "
                     "its stored advertisements", self.number, self.attempt)
        else:
            self.server, self.bundles, self.inboxes = restored.server, restored.bundles, restored.inboxes
            self.uploads = restored.uploads
            self.saved.files.remove_unlisted(self.server.stage, self.uploads)  # a crash may have left others
            self.sketch, self.survivors, self.saved.plan = restored.sketch, restored.survivors, restored.plan
            for name in ("bytes_up", "bytes_down", "seconds"):
                getattr(self, name).update(restored.counters.get(name, {}))
            self.resumed.clear()  # answers wait until the interrupted step is handed out again
            log.info("round %d attempt %d: resuming secure aggregation at %s (stage %d) from the saved state",
                     self.number, self.attempt, self.server.phase, self.server.stage)
        return True

    async def handed_out(self, timeout: float) -> None:
        """Wait (at most ``timeout``) while a resumed attempt's interrupted step is not handed out again."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.resumed.wait()

    async def save_answer(self, index: int, commit: GroupCommit) -> sa.SecureTask:
        """Client ``index``'s step, answered, once ``commit`` saved the answer; the step (its own
        objects: a deadline may end it meanwhile) ends once its last answer is saved."""
        steps, done = self.steps, self.done
        step = steps.pop(index)
        try:
            await commit.flush()
        finally:  # a failed write (a full disk) is retried by the next one
            if not steps:
                done.set()
        return step

    def release(self, index: int) -> bool:
        """Client ``index`` is known gone: no step waits for it any more (True when one was open for it)."""
        self.gone.add(index)
        if self.steps.pop(index, None) is None:
            return False
        if not self.steps:
            self.done.set()
        return True

    def counters(self) -> dict[str, dict[str, float]]:
        return {"bytes_up": dict(self.bytes_up), "bytes_down": dict(self.bytes_down), "seconds": dict(self.seconds)}

    def index(self, client_id: str) -> int:
        if client_id not in self.ids:
            raise FailedPrecondition(f"secure aggregation: this client is not selected in round {self.number} "
                                     f"attempt {self.attempt}")
        return self.ids.index(client_id)
