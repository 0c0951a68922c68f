"""Training: deterministic batches, AdamW + cosine schedule, checkpoints, torchrun data parallel."""

from trustmoe.train.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
