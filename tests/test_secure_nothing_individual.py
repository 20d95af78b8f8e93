"""Nothing individual at the server: no client's Y_k, P_k or factors in what it kept (issue 30, Tests).

A real secure flora round of three real client processes. Each client writes what it alone
knows, in clear: its trained factors and its decoded pass vectors Y_k (stage 1) and P_k
(stage 2); the server writes every array and byte string in its Python heap at each unmasking
and when it writes the round (tests/secfaults/sitecustomize.py). Then every held array, every
file of the server's state directory and its log are compared with each client's clear values
(``leaks``): B_k, D_k = s_k B_k A_k, Y_k, P_k and their module blocks. Only the sums may
correlate, and what is computed from them alone (Q, the round's change, its downlink factors).
A fresh start's A_k is not compared: it is the run's seeded initialisation, the same rows for
every client, so the downlink's A correlates with it by construction. The scan is shown to see
what matters (the held arrays include the unmasked sums) and to catch a clear value (a planted
one is found).
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load, load_file

from client_harness import ServerView
from harness import server_factory  # noqa: F401 - a pytest fixture
from leaks import byte_leaks, holds_a_sum, leaks
from secure_processes import attempt_key, finish_all, hooked_env, start_hooked, trained
from test_client_integration import RUN_FLAGS

RANKS = {"r4": 4, "r2": 2, "r1": 1}


def _clear(dump, key: str) -> tuple[dict[str, np.ndarray], list[np.ndarray], int]:
    """Each client's clear values of the attempt, the sums (and Q) the server may hold, the scale bits."""
    clear, stages = {}, {}
    for name in RANKS:
        client = trained(dump, name, key)
        for module, (a, b) in client.pairs.items():  # not A: a fresh start's A is the run's seeded init, every
            d = client.scaling * b.double() @ a.double()  # client's rows the same; its data is in B and D = s B A
            clear.update({f"{name} B {module}": b.numpy(), f"{name} D {module}": d.numpy(),
                          f"{name} D^T {module}": d.T.contiguous().numpy()})
        for stage in (1, 2):
            with np.load(dump / f"{name}-{key}-s{stage}.npz", allow_pickle=False) as saved:
                values = {k: saved[k] for k in saved.files}
            stages.setdefault(stage, []).append(values)
            label = "Y" if stage == 1 else "P"
            clear.update({f"{name} {label}{k[len('vector'):] or ''}": v for k, v in values.items()
                          if k == "vector" or k.startswith("block")})
    allowed = []
    for stage, per_client in stages.items():
        for part in (k for k in per_client[0] if k == "vector" or k.startswith("block")):
            allowed.append(sum(values[part] for values in per_client))
        allowed += [v for k, v in per_client[0].items() if k.startswith("q.")]
    bits = int(stages[1][0]["bits"][0])
    return clear, allowed, bits


@pytest.mark.slow
@pytest.mark.timeout(900)  # three client processes and heap dumps: minutes on a loaded machine
def test_the_server_keeps_only_masked_values_and_sums(tmp_path, server_factory):  # noqa: F811
    dump, held_dump = tmp_path / "dump", tmp_path / "held"
    dump.mkdir()
    held_dump.mkdir()
    server = server_factory(*RUN_FLAGS, "--rounds", "1", "--min-clients", str(len(RANKS)), "--secure-aggregation",
                            env=hooked_env(held_dump, server=True))
    clients = [start_hooked(tmp_path, server.address, name, rank, 10 * i, hooked_env(dump))
               for i, (name, rank) in enumerate(RANKS.items())]
    finish_all(clients)
    view = ServerView(server.address, clients[0].identity().token)
    try:
        run_id = view.status().run.run_id
    finally:
        view.close()
    key = attempt_key(run_id, 1, 1)
    clear, allowed, bits = _clear(dump, key)
    change = {}  # the round's change per module, which the server computes and keeps
    for name in RANKS:
        client = trained(dump, name, key)
        for module, d in client.change().items():
            change[module] = change.get(module, 0) + d / len(RANKS)
    allowed += [d.numpy() for d in change.values()]
    # What the server publishes to every client is the sum's by definition: the round's downlink.
    # (Its factors' rows approach single clients' A rows when their subspaces are far apart.)
    allowed += list(load_file(server.state_dir / "downlink" / "v000001.safetensors").values())

    snapshots = sorted(held_dump.glob(f"server-{key}-*.npz"))
    assert [p.stem.rsplit("-", 1)[1] for p in snapshots] == ["unmask1", "unmask2", "write"]
    for path in snapshots:
        with np.load(path, allow_pickle=False) as saved:
            held = {f"{path.stem}:{k}": saved[k] for k in saved.files}
        assert not leaks(held, clear, allowed), path.stem
        if path.stem.endswith("unmask1"):  # the scan sees the heap: the unmasked sum is in it
            assert holds_a_sum(held, allowed[0]), "the stage-1 sum is not among the held arrays"

    server.stop()
    files = [p for p in server.state_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    for path in files:
        blob = path.read_bytes()
        assert not byte_leaks(blob, clear, bits), path
        if path.parent.parent.name == "updates":  # the public keys, stored in the updates' place
            assert len(blob) < 1024, path
        elif path.suffix == ".safetensors":
            tensors = {f"{path.name}:{k}": v for k, v in load(blob).items()}
            assert not leaks(tensors, clear, allowed), path
    log = server.output()
    assert not byte_leaks(log.encode(), clear, bits)
    for name, value in clear.items():
        top = float(value.reshape(-1)[np.argmax(np.abs(value))])
        assert not any(text in log for text in (repr(top), f"{top:.6g}", f"{top:.5e}")), name


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
