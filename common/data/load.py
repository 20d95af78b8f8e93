"""The one way any data source becomes examples: read, map columns, settle the form, template.

The client's ``--data``, the server's ``validation_data``, ``flora-sim`` and the demo all call
:func:`load_examples`, so a file is read the same way (and refused with the same message) by
each. A source's form is that of its first record unless ``data_format`` forces one; every
record must then fit it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from flora.common.data.errors import DataFormatError, FieldError
from flora.common.data.examples import Conversation, Example
from flora.common.data.forms import CHAT_FORMS, FORMS_BY_NAME, RecordForm, check_form, detect_form, map_fields, parse_fields
from flora.common.data.readers import read_source
from flora.common.data.templates import CHAT, Template, get_template, to_example

log = logging.getLogger(__name__)

Source = str | os.PathLike[str]


@dataclass(frozen=True)
class ReadOptions:
    """How sources are read: the template, the forced form ("auto": detected), column mapping."""

    template: str = "alpaca"
    data_format: str = "auto"
    fields: tuple[str, ...] = ()  # "FORM_KEY=YOUR_KEY" each

    def validated(self) -> tuple[Template, RecordForm | None, dict[str, str]]:
        """The template, forced form and field mapping, or a ValueError naming the bad option."""
        if self.data_format != "auto" and self.data_format not in FORMS_BY_NAME:
            raise ValueError(f"--data-format {self.data_format!r}: use auto or one of {list(FORMS_BY_NAME)}")
        form = FORMS_BY_NAME.get(self.data_format)
        return get_template(self.template), form, parse_fields(self.fields)


def _file_form(source: Source, first: Mapping, forced: RecordForm | None, template: Template) -> RecordForm:
    form = forced or detect_form(first)
    if form.name in CHAT_FORMS and template != CHAT:
        raise DataFormatError(source, f"its records are chats ({form.name} form): they are rendered by the model's "
                              "own chat template, use --template chat")
    return form


def load_source(source: Source, options: ReadOptions = ReadOptions()) -> list[Example | Conversation]:
    """All records of one source as examples; the first record (or ``data_format``) sets the form."""
    template, forced, fields = options.validated()
    records = read_source(source)
    if not records:
        raise DataFormatError(source, "holds no records")
    form: RecordForm | None = None
    how = f"--data-format {forced.name}" if forced else "as its first record"
    examples = []
    for record in records:
        try:
            if not isinstance(record.value, Mapping):
                raise FieldError(None, f"is a {type(record.value).__name__}, not an object")
            value = map_fields(record.value, fields)
            if form is None:
                form = _file_form(source, value, forced, template)
            check_form(value, form, how)
            example = to_example(form.parse(value), template)
        except FieldError as exc:
            raise DataFormatError(source, exc.problem, record=record.number, line=record.line, field=exc.field) from None
        if isinstance(example, Conversation):
            example = Conversation(example.messages, origin=f"{source}: record {record.number}")
        examples.append(example)
    log.debug("read %d %s records from %s", len(examples), form.name if form else "?", source)
    return examples


def load_examples(
    sources: Source | Iterable[Source], template: str = "alpaca", *, data_format: str = "auto", fields: Sequence[str] = ()
) -> list[Example | Conversation]:
    """Examples from one or more sources (files, folders, cached data sets), in order."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    options = ReadOptions(template, data_format, tuple(fields))
    examples = [example for source in sources for example in load_source(source, options)]
    if not examples:
        raise ValueError("no data files given")
    return examples
