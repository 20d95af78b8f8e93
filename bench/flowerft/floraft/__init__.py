"""Flower side of bench/peers_finetune.py: FedAvg over the PEFT LoRA state dict, flora's trainer on the clients."""
