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

Layouts an outside client must reproduce are in protos/PROTOCOL.md, "Secure aggregation: formats".
"""
