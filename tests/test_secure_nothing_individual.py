"""Nothing individual at the server: no client's Y_k, P_k or factors in what it kept (issue 30, Tests).

A real secure flora round of real client processes. Each client writes what it alone knows, in
clear: its trained factors and its decoded pass vectors Y_k (stage 1) and P_k (stage 2); the
server writes every array and byte string in its Python heap at each unmasking and when it
writes the round (tests/secfaults/sitecustomize.py). Then every held array, every file of the
server's state directory and its log are compared with each client's clear values (``leaks``):
B_k, D_k = s_k B_k A_k, Y_k, P_k and their module blocks. Only the sums may correlate, and what
is computed from them alone (Q, the round's change, the downlinks' factors). A fresh start's A_k
is not compared: it is the run's seeded initialisation, the same rows for every client, so the
downlink's A correlates with it by construction.

The real run is flora's secure run of tests/test_secure_methods_exact.py, which its exactness
tests share (test_the_server_keeps_only_masked_values_and_sums there, round 1 of three). Here:
the scan is shown to see what matters and to catch a clear value (a planted one is found).
"""

from __future__ import annotations

import numpy as np

from leaks import byte_leaks, leaks


def test_the_scan_finds_a_clear_value_among_masked_ones_and_sums():
    rng = np.random.default_rng(5)
    values = {name: rng.normal(size=4096) * 1e-3 for name in ("a", "b", "c")}
    bits = 40
    encoded = {n: np.round(np.ldexp(v, bits)).astype(np.int64).view(np.uint64) for n, v in values.items()}
    total = sum(values.values())
    masked = {n: e + rng.integers(0, 2**64 - 1, size=4096, dtype=np.uint64) for n, e in encoded.items()}
    held = {"masked sum": sum(masked.values()), **{f"masked {n}": m for n, m in masked.items()},
            "sum": np.round(np.ldexp(total, bits)).astype(np.int64).view(np.uint64), "float sum": total}
    assert not leaks(held, values, [total])
    stacked = np.stack([encoded["a"], masked["b"]])
    assert {(x.held, x.value) for x in leaks({**held, "kept b": values["b"].astype(np.float32), "stack": stacked},
                                             values, [total])} == {("kept b", "b"), ("stack", "a")}
    assert leaks(held, values, []), "without the sums allowed, the sums are found"
    blob = b"header" + encoded["c"].astype("<u8").tobytes() + b"trailer"
    assert byte_leaks(blob, values, bits) == ["c as fixed point"]
    assert not byte_leaks(b"".join(m.astype("<u8").tobytes() for m in masked.values()), values, bits)
