"""flora-sim: FLoRA experiments with K clients and the server aggregation in one process."""
