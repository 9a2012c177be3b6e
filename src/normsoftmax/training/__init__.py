"""Training: the recipe (:mod:`.recipe`), its schedule (:mod:`.schedule`), checkpoints (:mod:`.checkpoint`)
and the run directory's other files (:mod:`.run_directory`)."""

from .checkpoint import load_checkpoint, load_embedder
from .recipe import train_embedder

__all__ = ["train_embedder", "load_embedder", "load_checkpoint"]
