"""ServerApp: Flower's standard ``FedAvg`` over the PEFT LoRA state dict, evaluated centrally.

The initial arrays are PEFT's state dict of flora's version-0 global LoRA (``seeded_lora`` from
flora-sim's "global-lora" seed: the LoRA flora's ``fedit`` starts from; the FlowerTune template
takes PEFT's own random init instead). Every round all clients train (fraction_train 1, no
federated evaluation); ``evaluate_fn`` scores the global model on bench.quality's validation set
with flora's ``evaluate_loss`` before round 1 and after each round. The Grid is wrapped to count
the bytes of every message the strategy sends and receives (``floraft.task.message_bytes``).
Results: one JSON file at the run config's ``out``.
"""

import json
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from peft import set_peft_model_state_dict

from flora.common.basemodel import target_module_shapes
from flora.common.evaluate import evaluate_loss
from flora.common.lora import seeded_lora
from flora.sim.engine import derive_seed
from floraft.task import Settings, array_bytes, base_model, federation, message_bytes, peft_model, state_dict_of

app = ServerApp()
EVAL_BATCH = 16  # flora.sim.engine.SimConfig.eval_batch_size


class CountingGrid:
    """The runtime's Grid, with the bytes of each round's messages counted (per direction, per round)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.rounds: dict[int, dict] = {}

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        number = int(messages[0].content["config"]["server-round"])
        down = [message_bytes(m) for m in messages]
        down_arrays = [array_bytes(m) for m in messages]
        start = time.time()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.rounds[number] = {
            "messages_down": len(messages), "down_bytes": sum(down), "down_array_bytes": sum(down_arrays),
            "messages_up": len(replies), "up_bytes": sum(message_bytes(r) for r in replies if not r.has_error()),
            "up_array_bytes": sum(array_bytes(r) for r in replies if not r.has_error()),
            "errors": [str(r.error.reason) for r in replies if r.has_error()], "seconds": time.time() - start,
        }
        return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = Settings.from_run_config(context.run_config)
    validation = federation(settings).validation
    model = base_model(settings)
    shapes = target_module_shapes(model, None)  # the family's default targets
    initial = seeded_lora(shapes, settings.rank, settings.alpha / settings.rank, derive_seed(settings.seed, "global-lora"))
    initial_arrays = ArrayRecord(state_dict_of(model, initial, settings))
    evaluated = peft_model(model, settings)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_peft_model_state_dict(evaluated, arrays.to_torch_state_dict())
        return MetricRecord({"validation-loss": evaluate_loss(evaluated, validation, batch_size=EVAL_BATCH)})

    while len(list(grid.get_node_ids())) < settings.num_clients:
        time.sleep(0.5)
    counting = CountingGrid(grid)
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=settings.num_clients,
                      min_available_nodes=settings.num_clients)
    start = time.time()
    result = strategy.start(grid=counting, initial_arrays=initial_arrays, num_rounds=settings.rounds,
                            train_config=ConfigRecord(), evaluate_fn=evaluate)
    losses = {int(r): float(m["validation-loss"]) for r, m in result.evaluate_metrics_serverapp.items()}
    train = {int(r): float(m["train-loss"]) for r, m in result.train_metrics_clientapp.items()}
    history = [{"round": r, "validation_loss": losses[r], "train_loss": train.get(r), **counting.rounds.get(r, {})}
               for r in sorted(losses)]
    with open(settings.out, "w") as out:
        json.dump({"seed": settings.seed, "seconds": time.time() - start, "history": history}, out)
