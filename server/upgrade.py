"""Converting a state directory of the stacked downlink format to the canonical one, at start.

The first flora.v1 servers stored (and served) each flora version as the stacked global adapter:
every client's factors side by side. A state directory they wrote is converted in place: each
stacked adapter becomes its exact global update (``flora.common.downlink``, no compression), the
database rows move to the new files in one transaction, and the stacked files are deleted. The
merged weights already on disk stay valid (the new updates merge to the same model up to
round-off), so the run continues where it stopped. A crash part way leaves the database on the
old files, and the next start converts again from them.
"""

from __future__ import annotations

import logging

from flora.common.downlink import plan_downlink
from flora.common.payload import PayloadError, PayloadMeta, read_adapter, write_update
from flora.server.layout import Layout
from flora.server.store import Artifact, Store

log = logging.getLogger(__name__)


class UpgradeError(RuntimeError):
    """A stored stacked adapter that cannot be converted; the message says which and what to do."""


def convert_stacked_downlinks(layout: Layout, store: Store, shapes: dict[str, tuple[int, int]]) -> int:
    """Re-factor every stored stacked global adapter into a global update; returns how many."""
    stacked = [a for a in store.artifacts("global") if a.version > 0 and a.path.startswith("globals/")]
    if not stacked:
        return 0
    log.info("converting %d stacked global adapters to global updates (state directory of an earlier release)", len(stacked))
    converted = []
    for old in stacked:
        try:
            adapter, meta = read_adapter(layout.absolute(old.path), shapes)
        except (PayloadError, OSError) as exc:
            raise UpgradeError(
                f"{old.path}: cannot be read as a stacked global adapter ({exc}); restore it from a backup, "
                "or finish this run with the flora release that created it"
            ) from None
        if meta.kind != "global_adapter" or adapter.scaling != 1.0:
            raise UpgradeError(f"{old.path}: holds a {meta.kind!r} payload, not a stacked global adapter of scaling 1")
        path = layout.downlink(old.version)
        path.parent.mkdir(parents=True, exist_ok=True)
        update = plan_downlink(adapter.pairs).update
        size, sha = write_update(path, update, PayloadMeta("global_update", round=old.version, version=old.version))
        converted.append(Artifact("global", old.version, layout.relative(path), sha, size))
    store.replace_artifacts(converted)
    for old in stacked:
        layout.absolute(old.path).unlink(missing_ok=True)
    return len(converted)
