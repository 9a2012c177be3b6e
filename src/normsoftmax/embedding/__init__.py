"""Embeddings: images -> vectors with an embedder (:mod:`.embed`), the ``.npz`` files that hold them
(:mod:`.files`), and the ``embed`` command (:mod:`.command`)."""

from .command import embed_files
from .embed import embed_dataset, embed_images, eval_dataset
from .files import (
           EmbeddingsFile,
           load_embeddings_npz,
           read_embeddings,
           save_embeddings_npz,
           write_embeddings,
)

__all__ = ["embed_files", "embed_images", "embed_dataset", "eval_dataset", "load_embeddings_npz", "save_embeddings_npz",
           "read_embeddings", "write_embeddings", "EmbeddingsFile"]
