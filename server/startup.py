"""Opening a state directory: create the run, or resume the stored one exactly where it stopped.

A fresh directory gets a new run with its version-0 artifacts. An existing one must hold the
same run (same base model, method, target modules and, for the methods with one scaling, the
same global LoRA shape) or the server refuses to start; the model is brought back to the committed version, the
current round is rebuilt as stored (deadline included), and leftovers of an interrupted write
are removed: nothing that the database does not refer to is kept.
"""

from __future__ import annotations

import logging
import resource
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from flora.server.aggregator import Aggregator
from flora.server.config import ServerSettings
from flora.server.export import write_history
from flora.server.layout import ARTIFACT_FOLDERS, Layout
from flora.server.round_settings import round_policy
from flora.server.rounds import RoundMachine
from flora.server.store import RunRecord, Store
from flora.server.upgrade import UpgradeError, convert_stacked_downlinks

log = logging.getLogger(__name__)

# Settings that define a run: changing one between restarts would mix incompatible rounds.
# Descriptors the process needs besides its clients (database, WAL, model files, gRPC, logging).
FD_RESERVE = 64
# Descriptors a client may hold at once: its connection, plus an upload's temporary file.
FDS_PER_CLIENT = 2

RUN_DEFINING = ("base_model", "method", "target_modules", "model_dtype", "lora_rank", "lora_alpha", "rslora")
# A DP run's releases and accounting: stored only with DP on, so that a run of an earlier
# release matches, and DP cannot be switched on or off (or its noise changed) mid-run.
DP_DEFINING = ("dp_noise_multiplier", "dp_clip_norm", "dp_release", "dp_accountant", "dp_delta")


class StartupError(RuntimeError):
    """The server cannot start with this configuration and state directory; the message says why."""


def defining_settings(settings: ServerSettings, target_modules: Sequence[str]) -> dict:
    """The run-defining settings as stored with the run, with the target modules as resolved on
    the model (an unset setting is the family's default, all-linear its layers' suffixes)."""
    dumped = {**settings.model_dump(mode="json"), "target_modules": sorted(target_modules)}
    return {key: dumped[key] for key in RUN_DEFINING + (DP_DEFINING if settings.dp_enabled else ())}


def open_run(settings: ServerSettings, layout: Layout, store: Store, aggregator: Aggregator) -> RunRecord:
    """The run of this state directory: created now, or checked and restored (blocking)."""
    run = store.run()
    if run is None:
        artifacts, loss = aggregator.initial()
        run = RunRecord(
            run_id=uuid.uuid4().hex, base_model=settings.base_model, base_model_hash=aggregator.fingerprint,
            method=settings.method, target_modules=sorted(aggregator.shapes), settings=defining_settings(settings, aggregator.target_modules),
            version=0, created=time.time(),
        )
        record = None if loss is None else {"round": 0, "version": 0, "validation_loss": loss, "committed_unix": run.created}
        store.create_run(run, artifacts, record)
        log.info("created run %s in %s", run.run_id, layout.root)
        return run
    check_same_run(run, settings, aggregator.target_modules, aggregator.fingerprint)
    if store.artifact("merged", run.version) is None:
        raise StartupError(
            f"the state directory holds a {run.method} run of an earlier release, which kept the global LoRA "
            "outside the model: finish it with that release, or start this one with a new state_dir"
        )
    if run.method == "flora":  # only flora runs of earlier releases stored stacked downlinks
        try:
            convert_stacked_downlinks(layout, store, aggregator.shapes)
        except UpgradeError as exc:
            raise StartupError(str(exc)) from None
    remove_orphans(layout, store, run.version)
    try:
        write_history(layout.history, store.history())  # it may lag the database after a crash
    except OSError as err:  # a full disk: serve what can be served and wait for space
        log.error("history.jsonl could not be rewritten (%s); it is rewritten at the next commit", err)
    artifacts = {kind: store.artifact(kind, run.version) for kind in ("global", "merged", "remainder", "lora")}
    aggregator.restore(run.version, {k: a for k, a in artifacts.items() if a is not None})
    log.info("resuming run %s at version %d", run.run_id, run.version)
    return run


def check_same_run(run: RunRecord, settings: ServerSettings, target_modules: Sequence[str], model_hash: str) -> None:
    """Refuse a configuration that contradicts the stored run, naming every difference."""
    stored, wanted = run.settings, defining_settings(settings, target_modules)
    diffs = [
        f"{key}: stored {stored.get(key)!r}, configured {wanted.get(key)!r}"
        for key in RUN_DEFINING + DP_DEFINING if stored.get(key) != wanted.get(key)
    ]
    if not diffs and model_hash != run.base_model_hash:
        diffs.append(f"base model weights: stored hash {run.base_model_hash[:12]}, loaded {model_hash[:12]}")
    if diffs:
        raise StartupError(
            f"the state directory holds run {run.run_id} with different settings ("
            + "; ".join(diffs) + "): use the run's settings or a new state_dir"
        )


def remove_orphans(layout: Layout, store: Store, version: int) -> None:
    """Delete files no committed row refers to (left by a crash between a write and its commit)."""
    kept = {layout.absolute(p) for p in store.update_paths() | store.artifact_paths()}
    for folder in ARTIFACT_FOLDERS:
        for path in sorted((layout.root / folder).rglob("*")):
            if path.is_file() and path not in kept:
                log.info("removing %s: not referred to by the database", layout.relative(path))
                path.unlink()
    for checkpoint in sorted(layout.checkpoints.glob("v*")):
        if checkpoint.name[1:].isdigit() and int(checkpoint.name[1:]) > version:
            log.info("removing %s: its round was not committed", layout.relative(checkpoint))
            shutil.rmtree(checkpoint)


def restore_machine(settings: ServerSettings, store: Store, version: int) -> RoundMachine:
    """The round machine as stored: the committed version and the current round's attempt."""
    current = None if version >= settings.rounds else store.load_round(version + 1)
    return RoundMachine(round_policy(settings), version, current)


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; log the clients it leaves room for.

    Every connected client costs a socket and an upload a file besides, so the common default
    soft limit of 1,024 would refuse a large run's uploads with EMFILE long before the hard
    limit does. Returns the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as err:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, wanted, err)
    capacity = max(0, (soft - FD_RESERVE) // FDS_PER_CLIENT)
    log.info("open-file limit %d: room for about %d clients uploading at once (ulimit -n raises it)", soft, capacity)
    return soft


def state_dir_path(settings: ServerSettings) -> Path:
    """The state directory, absolute (so stored relative paths never depend on the cwd)."""
    return settings.state_dir.expanduser().resolve()
