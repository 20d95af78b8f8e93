"""Real secure-aggregation runs for tests: hooked client processes, their clear dumps, the oracle.

The clients run with tests/secfaults/sitecustomize.py on their PYTHONPATH: it kills or delays a
client at a chosen step of a chosen round, and writes what each client alone knows (its trained
LoRA, its clear pass vectors) to a dump folder. From those dumps a test computes what plain
stacking over a round's survivors gives, and compares it with what the server committed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from client_harness import ClientProcess, start_client, write_data
from flora.common.payload import artifact_limits, read_update
from flora.common.update import module_delta
from flora.server.secure_round import round_seed

INJECTOR = Path(__file__).parent / "secfaults"


def hooked_env(dump: Path | None = None, faults: str = "", flags: Path | None = None, late_s: float = 0.0,
               server: bool = False) -> dict[str, str]:
    """The environment that loads the hooks: ``faults`` "ROUND:STEP:ACTION,..." whose flag files
    (``flags``/<name>-r<round>-<step>) exist once each; ``dump`` the clients' (or, with
    ``server``, the server's) dump folder."""
    env = {"PYTHONPATH": str(INJECTOR)}
    if dump is not None:
        env["FLORA_TEST_SECAGG_SERVER_DUMP" if server else "FLORA_TEST_SECAGG_DUMP"] = str(dump)
    if faults:
        env.update(FLORA_TEST_SECAGG_FAULT=faults, FLORA_TEST_SECAGG_FAULT_DIR=str(flags),
                   FLORA_TEST_SECAGG_LATE_S=str(late_s))
    return env


def start_hooked(tmp_path: Path, address: str, name: str, rank: int, offset: int, env: dict[str, str],
                 *extra: str) -> ClientProcess:
    """A client with its own data (``offset`` makes it differ from the others') and the hooks."""
    data = tmp_path / f"{name}.json"
    if not data.exists():
        write_data(data, "dolly", count=8, offset=offset)
    return start_client(address, name, data, tmp_path / f"state-{name}", rank, "--max-steps", "1", *extra, env=env)


def finish_all(clients: list[ClientProcess], timeout: float = 600.0) -> None:
    """Wait for every client to exit 0 (a generous bound: these runs start several processes)."""
    for client in clients:
        status = client.wait(timeout)
        assert status == 0, f"client {client.name} exited {status}; its log:\n{client.log()}"


def supervise(clients: dict[str, ClientProcess], restart: Callable[[str], ClientProcess], timeout: float) -> list[str]:
    """Wait for every client to finish, restarting each one SIGKILLed; the names restarted, in order."""
    restarted, end = [], time.monotonic() + timeout
    while True:
        status = {name: client.process.poll() for name, client in clients.items()}
        for name, code in status.items():
            if code == -9:
                clients[name] = restart(name)
                restarted.append(name)
            elif code not in (None, 0):
                raise AssertionError(f"client {name} exited {code}; its log:\n{clients[name].log()}")
        if all(code == 0 for code in status.values()):
            return restarted
        if time.monotonic() > end:
            raise AssertionError(f"the clients did not finish in {timeout}s: {status}")
        time.sleep(0.2)


@dataclass(frozen=True)
class Trained:
    """One client's trained LoRA of one attempt, as its dump holds it."""

    name: str
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A, B)
    scaling: float
    num_examples: int

    def change(self) -> dict[str, torch.Tensor]:
        """s B A per module, in float64 (a fresh start: no init to subtract)."""
        return {n: self.scaling * b.double() @ a.double() for n, (a, b) in self.pairs.items()}


def attempt_key(run_id: str, number: int, attempt: int) -> str:
    """How the dumps name an attempt: the first 8 bytes of its round seed, in hex."""
    return round_seed(run_id, number, attempt).hex()[:16]


def trained(dump: Path, name: str, key: str) -> Trained:
    """Client ``name``'s dumped LoRA of the attempt ``key``."""
    with safe_open(dump / f"{name}-{key}.safetensors", framework="pt") as f:
        meta = f.metadata()
        modules = sorted({k.rsplit(".", 1)[0] for k in f.keys()})
        pairs = {m: (f.get_tensor(f"{m}.a"), f.get_tensor(f"{m}.b")) for m in modules}
    return Trained(name, pairs, float(meta["scaling"]), int(meta["num_examples"]))


def stacked(clients: list[Trained], clip_norm: float) -> dict[str, torch.Tensor]:
    """Plain flora stacking's change over ``clients``: sum_k p_k c_k s_k B_k A_k, p_k by examples,
    c_k = min(1, C / |change_k|_F) as the plain server clips."""
    total = sum(c.num_examples for c in clients)
    out: dict[str, torch.Tensor] = {}
    for client in clients:
        change = client.change()
        norm = math.sqrt(sum(float((d * d).sum()) for d in change.values()))
        factor = client.num_examples / total * min(1.0, clip_norm / norm)
        for name, delta in change.items():
            out[name] = out.get(name, 0) + factor * delta
    return out


def committed_change(state_dir: Path, version: int, shapes: Mapping[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """The change the server committed for ``version`` (its downlink), in float64."""
    path = state_dir / "downlink" / f"v{version:06d}.safetensors"
    update, _ = read_update(path, shapes, limits=artifact_limits(path.stat().st_size, shapes))
    return {name: module_delta(update[name], torch.float64) for name in shapes}


def relative_error(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> float:
    """|got - want|_F / |want|_F over all modules."""
    diff = math.fsum(float(((got[n] - want[n]) ** 2).sum()) for n in want)
    norm = math.fsum(float((w ** 2).sum()) for w in want.values())
    return math.sqrt(diff / norm)


def clear_values(dump: Path, key: str, names: Iterable[str]) -> tuple[dict[str, np.ndarray], list[np.ndarray], int]:
    """What each client alone knows of the attempt ``key`` (its B, D = s B A, D^T, and its pass
    vectors Y and P with their module blocks), the sums (and Q) the server may hold, the scale bits.
    Not A: a fresh start's A is the run's seeded init, every client's rows the same."""
    clear, stages = {}, {}
    for name in names:
        client = trained(dump, name, key)
        for module, (a, b) in client.pairs.items():
            d = client.scaling * b.double() @ a.double()
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
