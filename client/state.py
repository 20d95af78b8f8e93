"""The client's state directory: who it is in which run, and which global version its model holds.

Layout (every file written atomically: temporary file, fsync, rename, fsync of the folder)::

    lock                         held (flock) while a daemon uses the directory
    identity.json    (0600)      run_id, client_id, token, server, name
    run.json                     the RunSpec of that run, as protobuf JSON
    state.json                   run_id and the global version the saved weights hold
    model/weights-v{t}.safetensors   the target modules' weights at version t (a quantized base:
                                     the cumulative global update held beside it, flora.update.v1)
    globals/                     downloaded, verified artifacts; ``*.part`` = resumable downloads
    outbox/update-r{n}.safetensors   an update being uploaded (streamed from disk, then deleted)

The version pointer in ``state.json`` moves only after ``weights-v{t}`` is durable, so a crash at
any moment leaves the client at an old version or the new one, never half-applied; the base
model plus ``weights-v{t}`` is the model at version t without downloading or merging anything.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO, Literal, TypeVar

from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from flora.common.chunks import write_atomic
from flora.common.payload import PayloadError, PayloadMeta, read_update, read_weights, write_update, write_weights
from flora.common.update import ModuleUpdate
from flora.v1 import run_pb2, transfer_pb2

log = logging.getLogger(__name__)

_KIND_NAMES = {
    transfer_pb2.ARTIFACT_KIND_GLOBAL_UPDATE: "update",
    transfer_pb2.ARTIFACT_KIND_GLOBAL_LORA: "lora",
    transfer_pb2.ARTIFACT_KIND_MERGED_MODULES: "merged",
}
_MAX_STATE_FILE = 1 << 20

M = TypeVar("M", bound=BaseModel)


class StateError(RuntimeError):
    """A state directory that cannot be used (locked by another daemon, or unreadable)."""


class Identity(BaseModel):
    """What a client needs to rejoin the same run as the same client."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str = Field(min_length=1)
    client_id: str = Field(min_length=1)
    token: str = Field(min_length=1)
    server: str
    name: str


class HeldVersion(BaseModel):
    """The durable pointer: the global version of the run whose weights are saved, and their form
    (``flora.client.local_weights``: merged weights, or the update held beside a quantized base)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str = Field(min_length=1)
    version: int = Field(ge=0)
    form: Literal["merged", "held"] = "merged"


class StateDir:
    """One client's state directory, locked for the lifetime of the object (see ``close``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.model_dir = self.root / "model"
        self.globals_dir = self.root / "globals"
        self.outbox_dir = self.root / "outbox"
        self._lock = self._acquire_lock()
        for folder in self._run_folders:
            folder.mkdir(exist_ok=True)

    @property
    def _run_folders(self) -> tuple[Path, ...]:
        return (self.model_dir, self.globals_dir, self.outbox_dir)

    def _acquire_lock(self) -> BinaryIO:
        """Two daemons sharing one directory would corrupt each other's version pointer."""
        file = open(self.root / "lock", "ab")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            raise StateError(f"state directory {self.root} is in use by another flora-client") from None
        return file

    def close(self) -> None:
        """Release the directory lock."""
        self._lock.close()

    # --- identity and run --------------------------------------------------------------------

    def load_identity(self) -> Identity | None:
        """The saved identity, or None when there is none (a first start)."""
        return self._read_json(self.root / "identity.json", Identity)

    def save_identity(self, identity: Identity) -> None:
        """Persist the identity; the token is a secret, so the file is private to the user."""
        write_atomic(self.root / "identity.json", identity.model_dump_json(indent=2).encode(), mode=0o600)

    def load_run(self) -> run_pb2.RunSpec | None:
        """The cached spec of the identity's run (lets a restart check its model before Join)."""
        path = self.root / "run.json"
        if not path.exists():
            return None
        try:
            return json_format.Parse(self._read_text(path), run_pb2.RunSpec())
        except json_format.ParseError as exc:
            log.warning("event=state_ignored file=%s reason=%r", path, str(exc))
            return None

    def save_run(self, spec: run_pb2.RunSpec) -> None:
        """Cache the run's spec beside the identity."""
        write_atomic(self.root / "run.json", json_format.MessageToJson(spec).encode())

    def reset_run(self) -> None:
        """Forget everything specific to a run: identity, spec, version pointer, weights, downloads."""
        for name in ("identity.json", "run.json", "state.json"):
            (self.root / name).unlink(missing_ok=True)
        for folder in self._run_folders:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
        log.info("event=state_reset dir=%s", self.root)

    # --- the held version -------------------------------------------------------------------

    def held_version(self, run_id: str, form: str = "merged") -> int:
        """The version the saved weights hold for ``run_id`` in ``form`` (0, the base model, when none).

        Saved state of the other form (the client was restarted with another ``--quantize``) is
        of no use to this model: it starts from the base and replays the updates.
        """
        held = self._read_json(self.root / "state.json", HeldVersion)
        if held is None or held.run_id != run_id:
            return 0
        if held.version and held.form != form:
            log.warning("event=state_ignored reason=other_form saved=%s needed=%s version=%d", held.form, form, held.version)
            return 0
        if held.version and not self.weights_path(held.version).exists():
            log.warning("event=state_ignored reason=missing_weights version=%d", held.version)
            return 0
        return held.version

    def weights_path(self, version: int) -> Path:
        """Where the target modules' weights at ``version`` are saved."""
        return self.model_dir / f"weights-v{version}.safetensors"

    def load_weights(self, version: int, expected: Mapping[str, tuple[int, int]]) -> dict[str, Tensor]:
        """The saved weights at ``version``, validated against the run's module shapes."""
        return self.load_saved(version, expected, "merged")

    def load_saved(self, version: int, expected: Mapping[str, tuple[int, int]], form: str) -> dict[str, ModuleUpdate]:
        """The saved state at ``version`` in ``form``: merged weights, or a held cumulative update."""
        read = read_weights if form == "merged" else read_update
        try:
            saved, meta = read(self.weights_path(version), expected)
        except PayloadError as exc:
            raise StateError(f"{self.weights_path(version)}: {exc}") from None
        if meta.version != version:
            raise StateError(f"{self.weights_path(version)}: holds version {meta.version}, not {version}")
        return saved

    def commit(self, run_id: str, version: int, weights: Mapping[str, ModuleUpdate], form: str = "merged") -> None:
        """Make ``version`` the held version: weights (or the held update) first, then the pointer, then prune."""
        if version > 0 and form == "merged":
            write_weights(self.weights_path(version), weights, PayloadMeta("merged_modules", version=version))
        elif version > 0:
            write_update(self.weights_path(version), weights, PayloadMeta("global_update", version=version))
        pointer = HeldVersion(run_id=run_id, version=version, form=form)
        write_atomic(self.root / "state.json", pointer.model_dump_json().encode())
        for path in self.model_dir.glob("weights-v*.safetensors"):
            if path != self.weights_path(version):
                path.unlink(missing_ok=True)
        self.prune_globals(below=version + 1)

    # --- downloads ----------------------------------------------------------------------------

    def artifact_path(self, kind: int, version: int) -> Path:
        """Where a downloaded artifact lives (its ``.part`` beside it while incomplete)."""
        return self.globals_dir / f"{_KIND_NAMES[kind]}-v{version}.safetensors"

    def outbox_path(self, round_number: int) -> Path:
        """Where the update of a round is staged while it is uploaded."""
        return self.outbox_dir / f"update-r{round_number}.safetensors"

    def prune_globals(self, below: int) -> None:
        """Delete downloads (complete or partial) of versions lower than ``below``."""
        for path in self.globals_dir.iterdir():
            stem = path.name.split(".", 1)[0]
            try:
                version = int(stem.rsplit("-v", 1)[1])
            except (IndexError, ValueError):
                continue
            if version < below:
                path.unlink(missing_ok=True)

    # --- helpers --------------------------------------------------------------------------------

    def _read_text(self, path: Path) -> str:
        if path.stat().st_size > _MAX_STATE_FILE:
            raise StateError(f"{path} is larger than {_MAX_STATE_FILE} bytes; not a flora state file")
        return path.read_text(encoding="utf-8")

    def _read_json(self, path: Path, model: type[M]) -> M | None:
        if not path.exists():
            return None
        try:
            return model.model_validate(json.loads(self._read_text(path)))
        except (ValueError, ValidationError) as exc:
            # A torn or foreign file: starting from the base model is always safe.
            log.warning("event=state_ignored file=%s reason=%r", path, str(exc).splitlines()[0])
            return None
