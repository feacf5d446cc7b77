"""Models: the LightningModule, its pretrained components, checkpoints, metrics and the runtime that runs
any saved form (checkpoint, release, ONNX)."""
