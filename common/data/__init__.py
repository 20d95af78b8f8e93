"""Training data: sources in the forms people keep, templates, tokens with their trained spans.

Clients train on it, the server and the simulation evaluate on it, so everything here is pure
(sources in, lists and tensors out) and knows nothing of gRPC. The modules, in pipeline order:

- ``readers``: a file (JSON, JSONL, CSV, parquet), a ``save_to_disk`` folder or a cached Hub data
  set as numbered records (through ``datasets`` for all but JSON);
- ``forms``: the record shapes (chat, ShareGPT, Alpaca, Dolly, prompt/completion, text), detected
  per file or forced, and ``--field`` column mapping;
- ``templates``: a parsed record as an :class:`Example` (prompt templates) or a
  :class:`Conversation` (``--template chat``);
- ``load``: :func:`load_examples`, the one function every component calls;
- ``chat`` and ``tokenize``: token ids with the spans that carry loss, and batches of them;
- ``folders``: per-client data folders and deterministic splits.
"""

from flora.common.data.chat import BUILTIN_CHAT_TEMPLATE
from flora.common.data.errors import DataFormatError
from flora.common.data.examples import IGNORE_INDEX, Conversation, Example, Message, TokenizedExample
from flora.common.data.folders import data_folder, split_examples
from flora.common.data.forms import DATA_FORMATS, FORMS
from flora.common.data.load import ReadOptions, load_examples, load_source
from flora.common.data.readers import DATA_SUFFIXES, INSTALL_DATASETS, read_source
from flora.common.data.templates import CHAT, TEMPLATES, PromptTemplate, get_template
from flora.common.data.tokenize import collate, prompt_ids, tokenize_examples

__all__ = [
    "BUILTIN_CHAT_TEMPLATE", "CHAT", "DATA_FORMATS", "DATA_SUFFIXES", "FORMS", "IGNORE_INDEX", "INSTALL_DATASETS",
    "TEMPLATES", "Conversation", "DataFormatError", "ReadOptions", "Example", "Message", "PromptTemplate",
    "TokenizedExample", "collate", "data_folder", "get_template", "load_examples", "load_source", "prompt_ids",
    "read_source", "split_examples", "tokenize_examples",
]
