"""Training: the loop (trainer.py) and its checkpoints (checkpoint.py).

    from minillm.train import Trainer, TrainConfig
    trainer = Trainer(model, TrainConfig(steps=2000, lr=1e-3), dataset, run_dir="runs/demo")
    trainer.resume()   # optional: continue from runs/demo's checkpoint
    trainer.fit()

``run.py`` resolves, builds and loads the run directories of ``minillm train`` (minillm/commands/train.py).
"""

from .checkpoint import (
    Checkpoint, CheckpointError, has_checkpoint, load_checkpoint, read_metadata, restore_checkpoint,
    save_checkpoint,
)
from .trainer import FitResult, TrainConfig, Trainer, TrainingDiverged, read_metrics

__all__ = [
    "Trainer", "TrainConfig", "FitResult", "TrainingDiverged", "read_metrics", "Checkpoint", "CheckpointError",
    "save_checkpoint", "load_checkpoint", "restore_checkpoint", "read_metadata", "has_checkpoint",
]
