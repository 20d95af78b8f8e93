"""Where everything lives in a server's state directory.

Every file name is built from server-made values (versions, rounds, client ids, hashes), never
from strings a client sent, so no request can steer a write outside these folders.

    state.db                         SQLite: run, clients, rounds, submissions, versions
    updates/r000003/<id>.<sha>.safetensors   accepted client updates of round 3
    downlink/v000003.safetensors     the downlink of version 3 (per module canonical factors or a
                                     dense delta of the round's update; what clients merge)
    remainders/v000003.safetensors   with a lossy downlink: what version 3 did not send, carried
                                     into round 4's update (never served)
    globals/v000003.safetensors      the global LoRA the method keeps at version 3 (fedex, ffa,
                                     flora-warm, ...: what round 4's clients start from)
    merged/v000003.safetensors       merged target-module weights of the latest version
    checkpoints/v000003/             Hugging Face checkpoint of version 3 (+ adapter/ for PEFT)
    history.jsonl                    one JSON line per round
    dp_releases.jsonl                differential privacy: each noisy pass sent to clients before its
                                     round committed (server/dp_releases.py), written before it is sent
    secure/r000003-a1.*              secure aggregation: what the server holds of round 3's attempt 1
                                     (server/secure_state.py), so that a restart resumes it
    tmp/                             uploads in flight and staging; emptied at start

A round's stacked factors are never written as such and never served: the accepted updates under
``updates/`` are the stack's only record, so no client can read another client's update.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

_SAFE_ID = re.compile(r"[0-9a-f]{1,64}")
# Folders of files that the database refers to (anything else in them is an orphan).
ARTIFACT_FOLDERS = ("updates", "downlink", "remainders", "globals", "merged")


@dataclass(frozen=True)
class Layout:
    """Paths of one state directory."""

    root: Path

    @property
    def database(self) -> Path:
        return self.root / "state.db"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def history(self) -> Path:
        return self.root / "history.jsonl"

    @property
    def dp_releases(self) -> Path:
        return self.root / "dp_releases.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def create(self) -> None:
        """Make every folder (idempotent)."""
        for folder in (self.root, self.tmp, *(self.root / name for name in ARTIFACT_FOLDERS), self.checkpoints):
            folder.mkdir(parents=True, exist_ok=True)

    def empty_tmp(self) -> None:
        """Remove what uploads in flight left in tmp/ when the last process died. The folder
        itself stays: on a full disk a new one may not be creatable, and the server must start."""
        for path in self.tmp.iterdir():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def update(self, round_number: int, client_id: str, sha256: str) -> Path:
        """Final place of an accepted update."""
        if not (_SAFE_ID.fullmatch(client_id) and _SAFE_ID.fullmatch(sha256)):
            raise ValueError("client id and sha256 must be lowercase hex")
        return self.root / "updates" / f"r{round_number:06d}" / f"{client_id}.{sha256}.safetensors"

    def keys(self, round_number: int, client_id: str, sha256: str) -> Path:
        """Final place of a secure round's advertised public keys (protobuf ``PublicKeys``, not
        safetensors), where a plain round keeps the update. The path is recorded with the
        submission and read from there, so a state saved under the former ``.safetensors`` name
        resumes as it is."""
        return self.update(round_number, client_id, sha256).with_suffix(".keys")

    def global_artifact(self, version: int) -> Path:
        """The global LoRA a method keeps at a version (artifact kind "lora"); a flora state directory
        of the stacked format (before the canonical downlink) kept its stacked global adapters here."""
        return self.root / "globals" / f"v{version:06d}.safetensors"

    def downlink(self, version: int) -> Path:
        """The downlink update of a version: what clients download and merge."""
        return self.root / "downlink" / f"v{version:06d}.safetensors"

    def remainder(self, version: int) -> Path:
        """What a lossy downlink of a version left out, carried into the next round."""
        return self.root / "remainders" / f"v{version:06d}.safetensors"

    def merged(self, version: int) -> Path:
        """Merged target-module weights of a version."""
        return self.root / "merged" / f"v{version:06d}.safetensors"

    def checkpoint(self, version: int) -> Path:
        """Hugging Face checkpoint folder of a version."""
        return self.checkpoints / f"v{version:06d}"

    def relative(self, path: Path) -> str:
        """``path`` as stored in the database: relative to the state directory."""
        return str(path.relative_to(self.root))

    def absolute(self, stored: str) -> Path:
        """A path read from the database, resolved inside the state directory."""
        path = (self.root / stored).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"stored path {stored!r} points outside the state directory")
        return path
