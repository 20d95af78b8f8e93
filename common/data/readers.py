"""Data sources as numbered records: JSON/JSONL files, CSV, parquet, ``save_to_disk`` folders and
data sets in the local Hugging Face cache.

JSON and JSON lines are read here (they need nothing beyond the standard library and report the
line of a syntax error); every other source goes through the ``datasets`` library, an optional
extra (``pip install 'flora-fl[datasets]'``) named in the error when it is missing. Nothing is
ever downloaded: a data set name is resolved from the local cache only, with the library forced
offline for the call. Records are numbered from 1.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flora.common.data.errors import DataFormatError

INSTALL_DATASETS = "pip install 'flora-fl[datasets]'"
JSON_SUFFIXES = (".json", ".jsonl")
# What ``datasets`` reads a file suffix as; any other suffix is read as JSON unless it is parquet.
PACKAGED = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
DATA_SUFFIXES = (*JSON_SUFFIXES, *PACKAGED)
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_PARQUET_MAGIC = b"PAR1"


@dataclass(frozen=True, slots=True)
class Record:
    """One record of a source: its 1-based number, its line in a JSON-lines file, its value."""

    number: int
    line: int | None
    value: Any


def read_source(source: str | os.PathLike[str]) -> list[Record]:
    """The records of a file, a ``save_to_disk`` folder (``FOLDER[:SPLIT]``) or a cached data set
    name (``OWNER/NAME[:SPLIT]``, the ``train`` split by default)."""
    path = Path(source).expanduser()
    if path.is_file():
        return read_file(path)
    if path.is_dir():
        return _read_saved(path, None)
    base, _, split = str(source).rpartition(":")
    if base and Path(base).expanduser().is_dir():
        return _read_saved(Path(base).expanduser(), split)
    return _read_cached(str(source))


def check_source(source: str) -> str:
    """``source`` if it names an existing file or folder, or could name a cached data set; settings
    validate with it so that a mistyped file name fails before anything starts."""
    base, _, _ = source.rpartition(":")
    if Path(source).expanduser().exists() or (base and Path(base).expanduser().is_dir()) or _could_be_hub_name(source):
        return source
    raise ValueError(f"{source}: no such file or folder")


def source_names(value: Any) -> Any:
    """A settings list of sources with paths given as ``Path`` turned to text; anything else is left
    for the field's own type check (a pydantic ``before`` validator)."""
    return [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value] if isinstance(value, list) else value


def check_sources(value: Any) -> Any:
    """:func:`source_names`, each name checked with :func:`check_source`."""
    value = source_names(value)
    return [check_source(v) if isinstance(v, str) else v for v in value] if isinstance(value, list) else value


def _could_be_hub_name(source: str) -> bool:
    name = source.partition(":")[0]
    return Path(name).suffix.lower() not in DATA_SUFFIXES and _HUB_NAME.fullmatch(name) is not None


def read_file(path: Path) -> list[Record]:
    """A file's records: CSV and parquet through ``datasets`` (by suffix or content), else JSON."""
    kind = PACKAGED.get(path.suffix.lower())
    if kind is None and _starts_with(path, _PARQUET_MAGIC):
        kind = "parquet"
    return _read_packaged(path, kind) if kind else read_json(path)


def read_json(path: Path) -> list[Record]:
    """A JSON array, else one JSON value per line (blank lines skipped, counted in line numbers)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start}); JSON, JSON lines, "
                              "CSV (.csv) and parquet (.parquet) are read") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataFormatError(path, "file is empty")
    if stripped.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataFormatError(path, f"invalid JSON at column {exc.colno}: {exc.msg}", line=exc.lineno) from None
        return [Record(number, None, value) for number, value in enumerate(values, start=1)]
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(Record(len(records) + 1, line_number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataFormatError(
                    path, f"invalid JSON ({exc.msg}); expected a JSON array or one JSON object per line", line=line_number
                ) from None
    return records


def _starts_with(path: Path, magic: bytes) -> bool:
    with path.open("rb") as f:
        return f.read(len(magic)) == magic


def _import_datasets(source: str | os.PathLike[str], what: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataFormatError(source, f"reading {what} needs the optional datasets package: {INSTALL_DATASETS}") from None
    return datasets


@contextlib.contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """No progress bars for the duration (the client's log is a log, not a terminal UI)."""
    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.utils.enable_progress_bars()


def _rows(dataset: Any) -> list[Record]:
    return [Record(number, None, row) for number, row in enumerate(dataset.to_list(), start=1)]


def _read_packaged(path: Path, kind: str) -> list[Record]:
    """CSV or parquet through ``datasets``, its arrow cache in a temporary folder removed after.

    CSV cells are read as text (no type guessing: an answer "42" stays "42", an empty cell is "").
    """
    datasets = _import_datasets(path, f"{kind} files")
    options: dict[str, Any] = {}
    if kind == "csv":
        options = {"features": _csv_features(path, datasets), "na_filter": False}
        if path.suffix.lower() == ".tsv":
            options["sep"] = "\t"
    try:
        with tempfile.TemporaryDirectory(prefix="flora-data-") as cache, _quiet(datasets):
            dataset = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True, **options)
            return _rows(dataset)
    except Exception as exc:  # pyarrow, pandas and datasets each raise their own kinds
        raise DataFormatError(path, f"cannot be read as {kind}: {_first_line(exc.__cause__ or exc)}") from None


def _first_line(exc: BaseException) -> str:
    """What a third-party reader said, on one line (its type when it said nothing)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _csv_features(path: Path, datasets: Any) -> Any:
    """Every column of the header as a string column."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f, delimiter=delimiter), None)
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not header:
        raise DataFormatError(path, "file is empty (a CSV file needs a header row naming its columns)")
    return datasets.Features({name: datasets.Value("string") for name in header})


def _read_saved(folder: Path, split: str | None) -> list[Record]:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    if not any((folder / name).is_file() for name in ("state.json", "dataset_dict.json")):
        raise DataFormatError(folder, "is a folder, but not one written by datasets' save_to_disk "
                              "(no state.json or dataset_dict.json); pass its data files instead")
    datasets = _import_datasets(folder, "save_to_disk folders")
    try:
        loaded = datasets.load_from_disk(str(folder), keep_in_memory=True)
    except Exception as exc:  # a damaged folder: missing shards, bad JSON metadata, arrow errors
        raise DataFormatError(folder, f"cannot be read as a save_to_disk folder: {_first_line(exc)}") from None
    return _rows(_pick_split(folder, loaded, split, "FOLDER:SPLIT"))


def _pick_split(source: str | os.PathLike[str], loaded: Any, split: str | None, syntax: str) -> Any:
    if not hasattr(loaded, "keys"):  # a single Dataset
        if split:
            raise DataFormatError(source, f"holds one data set, not splits; drop ':{split}'")
        return loaded
    splits = sorted(loaded.keys())
    chosen = split or ("train" if "train" in splits else splits[0] if len(splits) == 1 else None)
    if chosen not in splits:
        raise DataFormatError(source, f"has splits {splits}: name one as {syntax}" if not split
                              else f"has no split {split!r}; its splits are {splits}")
    return loaded[chosen]


def _read_cached(source: str) -> list[Record]:
    """A Hub data set already in the local Hugging Face cache; the Hub is never contacted."""
    name, _, split = source.partition(":")
    if not _could_be_hub_name(source):
        raise DataFormatError(source, "no such file or folder")
    datasets = _import_datasets(source, "a data set from the Hugging Face cache (or it is a missing file)")
    try:
        with _offline(datasets), _quiet(datasets):
            return _rows(datasets.load_dataset(name, split=split or "train"))
    except (ConnectionError, FileNotFoundError):
        raise DataFormatError(
            source, f"no such file or folder, nor a data set {name!r} in the local Hugging Face cache "
            f"({datasets.config.HF_DATASETS_CACHE}); nothing is downloaded: load it once with "
            "datasets.load_dataset where the Hub is reachable, or pass a file"
        ) from None
    except ValueError as exc:  # an unknown split
        raise DataFormatError(source, str(exc)) from None


@contextlib.contextmanager
def _offline(datasets: Any) -> Iterator[None]:
    """``datasets`` in offline mode for one call: it then resolves names from its cache only."""
    was = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = was
