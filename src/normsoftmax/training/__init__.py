"""Training: the recipe (:mod:`.recipe`), its schedule (:mod:`.schedule`) and the run directory's files
besides checkpoints (:mod:`.run_directory`). Checkpoints themselves live one layer down, in
:mod:`normsoftmax.checkpoint`, because every command that uses a trained model reads them."""

from .recipe import train_embedder

__all__ = ["train_embedder"]
