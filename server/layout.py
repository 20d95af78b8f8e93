"""Where everything lives in a server's state directory.

Every file name is built from server-made values (versions, rounds, client ids, hashes), never
from strings a client sent, so no request can steer a write outside these folders.

    state.db                         SQLite: run, clients, rounds, submissions, versions
    updates/r000003/<id>.<sha>.safetensors   accepted client updates of round 3
    globals/v000003.safetensors      global adapter (flora) or global LoRA (fedit, zeropad) of version 3
    merged/v000003.safetensors       merged target-module weights of the latest version (flora)
    checkpoints/v000003/             Hugging Face checkpoint of version 3 (+ adapter/ for PEFT)
    history.jsonl                    one JSON line per round
    tmp/                             uploads in flight and staging; emptied at start
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_SAFE_ID = re.compile(r"[0-9a-f]{1,64}")


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
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def create(self) -> None:
        """Make every folder (idempotent)."""
        for folder in (self.root, self.tmp, self.root / "updates", self.root / "globals", self.root / "merged", self.checkpoints):
            folder.mkdir(parents=True, exist_ok=True)

    def update(self, round_number: int, client_id: str, sha256: str) -> Path:
        """Final place of an accepted update."""
        if not (_SAFE_ID.fullmatch(client_id) and _SAFE_ID.fullmatch(sha256)):
            raise ValueError("client id and sha256 must be lowercase hex")
        return self.root / "updates" / f"r{round_number:06d}" / f"{client_id}.{sha256}.safetensors"

    def global_artifact(self, version: int) -> Path:
        """The global adapter (flora) or global LoRA (fedit, zeropad) of a version."""
        return self.root / "globals" / f"v{version:06d}.safetensors"

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
