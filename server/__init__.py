"""flora.server: the ``flora-server`` coordinator of a federated LoRA run.

Modules by concern: ``config`` (settings), ``rounds`` (the pure round state machine),
``store`` and ``layout`` (durable state), ``aggregator`` and ``export`` (the model and its
outputs), ``uploads``, ``coordinator`` and ``lifecycle`` (what the calls do and how rounds
advance), ``auth`` and ``servicer`` (the gRPC face), ``startup``, ``app`` and ``cli`` (process).
"""
