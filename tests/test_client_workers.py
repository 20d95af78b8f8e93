"""flora-client --nproc: a data-parallel worker group trains the round the single process trains."""

from __future__ import annotations

import logging
import threading
import time

import psutil
import pytest
import torch

from fake_coordinator import FakeCoordinator, global_update_payload, random_adapter, serving, tiny_spec
from flora.client.config import ClientSettings
from flora.client.daemon import Daemon
from flora.client.data_parallel import shard_rows
from flora.client.local import ConfigError
from flora.client.sync import UPDATE, expected_shapes
from flora.client.workers import worker_devices
from flora.common.payload import read_adapter
from flora.v1 import coordinator_pb2, run_pb2


@pytest.mark.parametrize(("count", "world"), [(7, 2), (1, 2), (0, 3), (10, 3), (3, 3)])
def test_shard_rows_partition_a_micro_batch_in_order(count, world):
    blocks = [shard_rows(count, rank, world) for rank in range(world)]
    assert [i for block in blocks for i in range(count)[block]] == list(range(count))
    assert max(b.stop - b.start for b in blocks) - min(b.stop - b.start for b in blocks) <= 1


def test_devices_name_the_processes_and_bad_ones_are_refused(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    assert worker_devices(ClientSettings(name="a", data=[data], nproc=3, device="cpu")) == ["cpu"] * 3
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="devices: device 'cuda:0' requested but CUDA is not available"):
            worker_devices(ClientSettings(name="a", data=[data], devices=["cuda:0", "cuda:1"]))
    with pytest.raises(ValueError, match=r"nproc \(3\) contradicts devices \(2 given\)"):
        ClientSettings(name="a", data=[data], devices=["cuda:0", "cuda:1"], nproc=3)
    with pytest.raises(ValueError, match=r"quantize \(nf4\) works with one training process, not 2"):
        ClientSettings(name="a", data=[data], nproc=2, quantize="nf4")  # workers would load merged weights


@pytest.fixture(scope="module")
def spec():
    return tiny_spec()


@pytest.fixture()
def data_file(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(
        f'{{"instruction": "Add {i} and {i * 7}", "input": "", "output": "{8 * i} is the sum"}}\n' for i in range(7)
    ))
    return train


def train_task(round_number: int, required: int, max_steps: int = 0) -> coordinator_pb2.Task:
    return coordinator_pb2.Task(train=coordinator_pb2.TrainTask(
        round=round_number, required_version=required, deadline_unix_ms=2**62,
        hints=run_pb2.TrainingHints(max_steps=max_steps),
    ))


def run_daemon(folder, fake, data_file, **values):
    """Run a daemon against ``fake`` until it finishes; returns its uploads."""
    with serving(fake) as address:
        settings = ClientSettings(
            name="alice", server=address, data=[data_file], state_dir=folder / "state", device="cpu", threads=1,
            rank=4, max_steps=2, batch_size=3, grad_accum=2, cutoff=64, progress="off", heartbeat_interval=0.1,
            rpc_timeout=5, long_poll=1, backoff_initial=0.01, backoff_max=0.05, **values,
        )
        assert Daemon(settings).run() == 0
    return fake.uploads


@pytest.mark.slow
@pytest.mark.parametrize(("group", "evidence"), [
    ({"nproc": 2}, "event=worker_group processes=2 shard=none"),  # each worker a whole copy (DDP-style)
    ({"nproc": 2, "shard": "full"}, "event=worker_group processes=2 shard=full"),  # FSDP: a shard of every layer each
    ({"devices": ["cpu", "cpu"], "shard": "layers"}, "event=layers_placed devices=cpu,cpu"),  # one process, two devices
], ids=["replicas", "fsdp", "layers"])
def test_several_devices_upload_the_single_process_factors(tmp_path, spec, data_file, group, evidence, capfd, caplog):
    # 7 examples in micro-batches of 3: the third micro-batch has one row, so one worker has none.
    caplog.set_level(logging.INFO, logger="flora.client")

    def uploaded(name, **values):
        fake = FakeCoordinator(spec, tasks=[train_task(2, 1)],
                               artifacts={(UPDATE, 1): global_update_payload(random_adapter(spec, 5, 1.0, seed=1), 1)})
        (header, payload), = run_daemon(tmp_path / name, fake, data_file, **values)
        return header, read_adapter(payload, expected_shapes(spec), rank=4)[0]

    (one_header, one), (two_header, two) = uploaded("one"), uploaded("group", **group)
    assert evidence in capfd.readouterr().err + caplog.text  # the workers log to the daemon's stderr
    assert (two_header.steps, two_header.num_examples, two_header.base_version) == (2, 7, 1)
    assert two_header.train_loss == pytest.approx(one_header.train_loss, rel=1e-5)
    for name, (a, b) in one.pairs.items():
        a2, b2 = two.pairs[name]
        assert torch.count_nonzero(b) > 0, "the single process trained"
        assert torch.linalg.norm(b2 - b) <= 1e-4 * torch.linalg.norm(b), name
        # A barely moves from its shared init; a group averaging rather than summing its gradients
        # leaves ~1e-5 here (through AdamW's eps), a summing one ~1e-8.
        assert torch.linalg.norm(a2 - a) <= 1e-6 * torch.linalg.norm(a), name


def _workers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "flora.client.worker" in " ".join(p.cmdline())]


@pytest.mark.slow
def test_a_killed_worker_fails_the_rounds_training_and_the_daemon_retries(tmp_path, spec, data_file):
    # The first task trains until a worker is killed; the retry (the round's task again) finishes.
    fake = FakeCoordinator(spec, tasks=[train_task(1, 0, max_steps=1_000_000), train_task(1, 0)])
    killed = []

    def kill_one_worker():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            workers = _workers()
            if len(workers) == 2 and fake.requests["Heartbeat"]:
                time.sleep(3.0)  # well into the round: loading or training
                workers[-1].kill()
                killed.append(workers[-1].pid)
            time.sleep(0.1)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    uploads = run_daemon(tmp_path, fake, data_file, nproc=2)
    killer.join()
    assert killed, "no worker was killed"
    assert len(uploads) == 1 and uploads[0][0].round == 1 and uploads[0][0].steps == 2
    assert len(fake.requests["NextTask"]) == 3  # the long task, its retry, then finished
    assert not _workers(), "no worker outlives its round"
