"""The one error a data source raises: it names the source, the 1-based record and the field.

Every reader and record form reports through it, so that a client, the server's validation data
and ``flora-sim`` print the same message for the same mistake, and the client exits with status 2.
"""

from __future__ import annotations

import os


class FieldError(ValueError):
    """A problem with one field of one record; the loader adds the source and record number."""

    def __init__(self, field: str | None, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"field {field!r}: {problem}" if field else problem)


class DataFormatError(ValueError):
    """A data source that cannot be read as training data; the message names file, record, field.

    Records are numbered from 1 in every message (the first record is record 1), and JSON lines
    also give their line number, which differs when the file has blank lines.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        problem: str,
        *,
        record: int | None = None,
        line: int | None = None,
        field: str | None = None,
    ):
        self.path, self.record, self.line, self.field = str(path), record, line, field
        where = str(path)
        if record is not None:
            where += f": record {record}" + (f" (line {line})" if line is not None else "")
        elif line is not None:
            where += f": line {line}"
        if field is not None:
            where += f": field {field!r}"
        super().__init__(f"{where}: {problem}")
