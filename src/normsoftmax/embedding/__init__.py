"""Embeddings: images -> vectors with an embedder (:mod:`.embed`), and the ``.npz`` files that hold them
(:mod:`.files`)."""

from .embed import embed_dataset, embed_images, eval_dataset
from .files import load_embeddings_npz, save_embeddings_npz

__all__ = ["embed_images", "embed_dataset", "eval_dataset", "load_embeddings_npz", "save_embeddings_npz"]
