"""Injected into test client and server processes (PYTHONPATH): secure-aggregation faults and dumps.

Nothing here is part of flora; it wraps functions of a process that put this folder on its
PYTHONPATH and set one of the variables below (tests/test_secure_dropouts.py and
tests/test_secure_methods_exact.py).

Client (``flora.client.cli``):
- FLORA_TEST_SECAGG_FAULT="ROUND:STEP:ACTION,..." with FLORA_TEST_SECAGG_FAULT_DIR=DIR: when
  the server asks this client for STEP (share, mask1, unmask1, mask2, unmask2) of round ROUND
  while the flag file DIR/<name>-r<ROUND>-<STEP> exists, the client removes it (so each fault
  fires once, also across restarts) and does ACTION: "kill" sends itself SIGKILL before
  answering, "late" waits FLORA_TEST_SECAGG_LATE_S seconds (past the step's deadline) and then
  answers as usual.
- FLORA_TEST_SECAGG_DUMP=DIR: the client writes what it alone knows, in clear: at each
  advertisement its trained LoRA (``<name>-<seed>.safetensors``: ``<module>.a``/``.b``, with
  rank, scaling, index and round in the metadata), and at each masked stage its decoded pass
  vector, each module's block of it, the scale bits and, in stage 2, the Q it received
  (``<name>-<seed>-s<stage>.npz``). <seed> is the
  first 8 bytes of the attempt's round seed in hex, so files of one attempt group together.

Server (``flora.server.cli``):
- FLORA_TEST_SECAGG_SERVER_DUMP=DIR: at each unmasking (after ``ServerRound.close_unmask``) and
  when the secure round's result is written (``Aggregator.write_round``), the server writes
  every numeric array and every byte string of 8n bytes reachable in its Python heap
  (``server-<seed>-<what>.npz``, <seed> as above, "write" for the write): what a test can
  then compare with the clients' clear values. Until the first write only: one round is what a
  test compares, and each walk of the heap takes seconds.
"""

import os

_FAULT = os.environ.get("FLORA_TEST_SECAGG_FAULT")
_FAULT_DIR = os.environ.get("FLORA_TEST_SECAGG_FAULT_DIR")
_DUMP = os.environ.get("FLORA_TEST_SECAGG_DUMP")
_SERVER_DUMP = os.environ.get("FLORA_TEST_SECAGG_SERVER_DUMP")
_MIN_ENTRIES = 256  # smaller arrays cannot be told from noise by correlation anyway
_MAX_ENTRIES = 1 << 21  # the model's embeddings and the like: larger than any round's vectors


def _client_name() -> str:
    import sys

    return sys.argv[sys.argv.index("--name") + 1] if "--name" in sys.argv else str(os.getpid())


def _claim_fault(number: int, label: str) -> str | None:
    """The action of a fault at step ``label`` of round ``number`` that has not fired yet, or None."""
    for fault in _FAULT.split(","):
        round_text, step, action = fault.split(":")
        if (int(round_text), step) != (number, label):
            continue
        try:
            os.unlink(os.path.join(_FAULT_DIR, f"{_client_name()}-r{number}-{step}"))
        except FileNotFoundError:
            return None
        return action
    return None


if _FAULT or _DUMP:
    import signal
    import time

    import numpy as np

    from flora.client import secure_stages as _stages
    from flora.common.secagg.fixedpoint import decode

    _handle, _contribution, _advertise = _stages.handle, _stages.client_contribution, _stages.advertise
    _current: dict = {}

    def _label(task) -> str:
        kind = task.WhichOneof("step")
        return kind if kind == "share" else f"{kind}{getattr(task, kind).stage}"

    def _faulty_handle(conn, session, task):
        label = _label(task)
        action = _claim_fault(task.round, label) if _FAULT else None
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "late":
            time.sleep(float(os.environ.get("FLORA_TEST_SECAGG_LATE_S", "10")))
        if session is not None:
            _current["seed"] = session.protocol.round_seed.hex()[:16]
        _current["label"] = label
        return _handle(conn, session, task)

    def _dumping_advertise(conn, spec, info, header, update, kept, method):
        from safetensors.torch import save_file

        session = _advertise(conn, spec, info, header, update, kept, method)
        if _DUMP:
            tensors = {f"{n}.{f}": getattr(p, f).contiguous() for n, p in update.pairs.items() for f in ("a", "b")}
            meta = {"rank": str(update.rank), "scaling": repr(update.scaling), "index": str(info.client_index),
                    "round": str(header.round), "num_examples": str(header.num_examples)}
            save_file(tensors, os.path.join(_DUMP, f"{_client_name()}-{info.round_seed.hex()[:16]}.safetensors"), meta)
        return session

    def _dumping_contribution(plan, stage, change, bases):
        blocks = _contribution(plan, stage, change, bases)
        if _DUMP:
            arrays = {"vector": decode(np.concatenate(blocks), plan.bits), "index": np.array([change.index]),
                      "bits": np.array([plan.bits]), **{f"block{j}": decode(b, plan.bits) for j, b in enumerate(blocks)}}
            if stage == 2:
                arrays.update({f"q.{name}": q.numpy() for name, q in bases.items()})
            np.savez(os.path.join(_DUMP, f"{_client_name()}-{_current.get('seed', 'none')}-s{stage}.npz"), **arrays)
        return blocks

    _stages.handle, _stages.client_contribution, _stages.advertise = _faulty_handle, _dumping_contribution, _dumping_advertise


if _SERVER_DUMP:
    import gc
    import sys

    import numpy as np
    import torch

    import flora.server.aggregator as _aggregator
    from flora.common.secagg.server import ServerRound

    _close_unmask, _write_round = ServerRound.close_unmask, _aggregator.Aggregator.write_round
    _last_seed: list[str] = ["none"]
    _written: list[bool] = [False]

    def _as_array(obj):
        if isinstance(obj, np.ndarray) and obj.dtype.kind in "iuf" and _MIN_ENTRIES <= obj.size <= _MAX_ENTRIES:
            return obj
        if isinstance(obj, torch.Tensor) and _MIN_ENTRIES <= obj.numel() <= _MAX_ENTRIES and not obj.is_complex():
            try:
                return obj.detach().to("cpu", torch.float64).numpy()
            except (RuntimeError, NotImplementedError):  # meta or otherwise unreadable tensors hold no values
                return None
        if isinstance(obj, (bytes, bytearray)) and 8 * _MIN_ENTRIES <= len(obj) <= 8 * _MAX_ENTRIES and len(obj) % 8 == 0:
            return np.frombuffer(bytes(obj), dtype="<u8")
        return None

    def _held() -> dict[str, np.ndarray]:
        """Every array reachable from a tracked object or a live frame of any thread, once each."""
        seen, found = set(), {}
        roots = gc.get_objects()
        for frame in sys._current_frames().values():
            while frame is not None:
                roots.append(frame.f_locals)
                frame = frame.f_back
        for root in roots:
            for obj in (root, *gc.get_referents(root)):
                if id(obj) in seen:
                    continue
                seen.add(id(obj))
                array = _as_array(obj)
                if array is not None:
                    found[f"a{len(found)}"] = array
        return found

    def _dump(what: str) -> None:
        np.savez(os.path.join(_SERVER_DUMP, f"server-{_last_seed[0]}-{what}.npz"), **_held())

    def _dumping_close_unmask(self):
        result = _close_unmask(self)
        _last_seed[0] = self.round_seed.hex()[:16]
        if not _written[0]:
            _dump(f"unmask{self.stage}")
        return result

    def _dumping_write_round(self, *args, **kwargs):
        if not _written[0]:
            _dump("write")
            _written[0] = True
        return _write_round(self, *args, **kwargs)

    ServerRound.close_unmask, _aggregator.Aggregator.write_round = _dumping_close_unmask, _dumping_write_round
