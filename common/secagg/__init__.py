"""Secure aggregation: the server learns only the sum of the clients' uint64 vectors.

Bonawitz et al. (CCS 2017) with the sparse neighbour graph of SecAgg+ (Bell et al., CCS 2020),
in process; the gRPC stages build on these pure pieces. One job per module:

- ``errors``: ``SecAggError(field, reason)``, raised before any state changes;
- ``keys``: X25519 key pairs, public-key validation, HKDF-SHA256 key derivation;
- ``prg``: mask expansion (AES-256-CTR) into uint64 vectors;
- ``shamir``: t-of-n sharing of 32-byte secrets over GF(2^521 - 1);
- ``graph``: the SecAgg+ neighbour graph and the threshold rules;
- ``messages``: the frozen messages the stages exchange (protobuf later);
- ``client`` / ``server``: the two state machines, clock-free and I/O-free;
- ``inprocess``: one whole round in one process (``masked_sum``, ``masked_stages``), for tests
  and benchmarks.

What the masked vectors hold (the maths layer, issue 30 item 2):

- ``fixedpoint``: floats to and from integers mod 2^64, with the run's announced scale;
- ``plan``: per aggregation method, the passes of a round and the layout of each pass's vector;
- ``contribution``: the client's side (clip, weight, project, encode);
- ``finish``: the server's side (from the unmasked sums to the method's ``RoundResult``);
- ``secure_round``: one whole round in one process, over any sum of uint64 vectors.
- ``wire``: the byte layouts both sides of the flora.v1 stages compute (keys digest, Q, vectors);
  the stages themselves are driven by ``flora.server.secure_round`` and ``flora.client.secure_stages``.

Layouts an outside client must reproduce are in protos/PROTOCOL.md, "Secure aggregation: formats"
and "Secure aggregation: the passes".
"""
