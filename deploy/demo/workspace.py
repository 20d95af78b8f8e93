"""The demo's working directory: its layout, and the data each client and the server get.

Data comes from the built-in generator, or from a folder of client files (one JSON/JSONL file
per client, e.g. ../shared/data/dolly-10clients). From such a folder a few records of every
client are held out, in their original form, to measure the merged model on data no client
trained on; a ``validation.json`` in the folder is used as is instead.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from flora.common.data import data_folder, read_source, split_examples
from flora.demo.sample_data import write_sample_data

MARKER = ".flora-demo"


@dataclass(frozen=True)
class Workspace:
    """Where the demo's server, clients, logs and data live."""

    root: Path

    @property
    def server_state(self) -> Path:
        return self.root / "server"

    def client_state(self, name: str) -> Path:
        return self.root / "clients" / name

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def data(self) -> Path:
        return self.root / "data"


def prepare(root: Path) -> Workspace:
    """Create ``root`` (or reset a previous demo's), refusing to touch any other folder."""
    root = root.resolve()
    if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
        raise ValueError(f"--workdir {root} exists, is not empty and is not a flora-demo folder; choose another")
    workspace = Workspace(root)
    for sub in (workspace.server_state, root / "clients", workspace.logs, workspace.data):
        shutil.rmtree(sub, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("created by flora-demo; reset by every run\n")
    return workspace


def builtin_data(workspace: Workspace, clients: int, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Generated non-IID sample data: (one training file per client, [validation file])."""
    paths, validation = write_sample_data(workspace.data, clients, seed=seed)
    return paths, [validation]


def folder_data(
    folder: Path, workspace: Workspace, clients: int, held_out: int = 20, seed: int = 0
) -> tuple[list[Path], list[Path]]:
    """Client files from ``folder``; validation from its validation.json or held-out records."""
    files, given = data_folder(folder)
    if len(files) < clients:
        raise ValueError(f"--data-dir {folder} has {len(files)} client data files; --clients asks for {clients}")
    files = files[:clients]
    if given:
        return files, given
    workspace.data.mkdir(parents=True, exist_ok=True)
    train_paths, validation_paths = [], []
    for k, path in enumerate(files):
        records = [record.value for record in read_source(path)]
        if len(records) <= held_out:
            raise ValueError(f"{path} has {len(records)} records; at least {held_out + 1} are needed to hold {held_out} out")
        train, validation = split_examples(records, held_out, seed=seed + k)
        train_paths.append(_write(workspace.data / f"client_{k}.json", train))
        validation_paths.append(_write(workspace.data / f"validation_{k}.json", validation))
    return train_paths, validation_paths


def _write(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
