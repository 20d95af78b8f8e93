"""flora: federated fine-tuning of language models with exact heterogeneous-rank LoRA stacking.

This folder is the root of the ``flora`` import package. The wire contract lives beside it in
``flora.v1`` (generated from ``protos/flora/v1/*.proto``); the other subpackages are mapped from
the repository's top-level folders: ``flora.common``, ``flora.server``, ``flora.client``.
"""

__version__ = "0.1.0"
