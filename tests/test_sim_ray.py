"""flora-sim --backend ray: a round's clients as tasks of a local Ray give the in-process result.

Ray is an optional extra (``pip install 'flora-fl[ray]'``); without it these tests skip.
"""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from flora.client.trainer import TrainConfig  # noqa: E402
from flora.common.basemodel import BUILTIN_MODEL, load_model  # noqa: E402
from flora.sim.backends import LocalBackend, RayBackend, make_backend  # noqa: E402
from flora.sim.engine import SimConfig, run_method  # noqa: E402
from flora.sim.federation import DataOptions, load_federation, sample_files  # noqa: E402

LOCAL = TrainConfig(max_steps=2, batch_size=4, learning_rate=1e-2, device="cpu")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_backend_matches_the_in_process_run(tmp_path, tiny_tokenizer, local_ray) -> None:
    files = sample_files(tmp_path, clients=2, per_client=16, seed=0)
    federation = load_federation(files, tiny_tokenizer, DataOptions(template="plain", cutoff=32, validation_fraction=0.25))
    config = SimConfig("flora-warm", (2, 1), 2, LOCAL)

    def history(backend):
        outcomes = list(run_method(load_model(BUILTIN_MODEL), federation.clients, federation.validation, config, backend))
        return [o.record.validation_loss for o in outcomes], outcomes[-1].updates

    here, here_updates = history(LocalBackend())
    there, there_updates = history(RayBackend())
    assert there == pytest.approx(here, abs=1e-5)
    assert [u.rank for u in there_updates] == [2, 1]


def test_make_backend_refuses_a_ray_address_without_ray_backend() -> None:
    with pytest.raises(ValueError, match="--ray-address applies to --backend ray"):
        make_backend("local", "auto")
