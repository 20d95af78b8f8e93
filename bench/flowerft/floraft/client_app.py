"""ClientApp: one FlowerTune-style round of local training, with flora's trainer and seeds.

The global LoRA arrives as PEFT's state dict; ``set_peft_model_state_dict`` loads it into a PEFT
wrapping of the base model, and its factors are what flora's ``train_lora`` starts from (as
flora-sim's ``fedit`` client starts from the global LoRA on the base weights). The trained
factors go back as PEFT's state dict with the client's example count, which FedAvg weights by.
"""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from transformers.utils import logging as hf_logging

from flora.client.trainer import train_lora
from floraft.task import Settings, adapter_from_state_dict, base_model, federation, state_dict_of

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this node's client (node config ``partition-id``) for the round the server names."""
    torch.set_num_threads(1)  # ten ClientApps share the machine, as bench.quality's one-thread workers do
    hf_logging.disable_progress_bar()
    settings = Settings.from_run_config(context.run_config)
    client = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    data = federation(settings).clients[client].train
    model = base_model(settings)
    start = adapter_from_state_dict(model, msg.content["arrays"].to_torch_state_dict(), settings)
    result = train_lora(model, data, settings.local(client, server_round), init=start)
    arrays = ArrayRecord(state_dict_of(model, result.adapter, settings))
    metrics = MetricRecord({"num-examples": result.num_examples, "train-loss": result.train_loss})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
