"""The ``index build``, ``index add`` and ``index search`` commands: thin layers over :class:`SearchIndex`.

What they add to the Python API: reading an embeddings file and recording where it came from (path and
SHA-256, so a rebuild from the same file is a no-op and a second ``add`` of it is refused), and, for search,
loading the model that embedded the index and refusing any other one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..config import IndexAddConfig, IndexBuildConfig, SearchConfig
from ..data.custom import IMAGE_EXTENSIONS
from ..embedding.files import EmbeddingsFile, read_embeddings
from ..files import file_sha256
from .index import METADATA_NAME, SCORE_NAMES, SearchIndex, choose_ivf_parameters

logger = logging.getLogger(__name__)


def read_source(path: str | os.PathLike) -> tuple[EmbeddingsFile, dict]:
    """An embeddings file written by ``normsoftmax embed`` and its provenance (file, sha256).

    Refuses files without model metadata: an index has to know which model made its vectors, so that its
    queries are embedded by the same one.
    """
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such embeddings file")
    try:
        embeddings = read_embeddings(file)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as error:  # e.g. zipfile.BadZipFile from a damaged .npz, which read_embeddings lets through
        raise ValueError(f"{file}: not a readable embeddings file ({type(error).__name__}: {error})") from None
    model = embeddings.metadata.get("model")
    if not isinstance(model, dict) or not model.get("digest"):
        raise ValueError(f"{file}: no model metadata (checkpoint and digest); an index needs to know which model "
                         f"made its vectors: write the file with `normsoftmax embed RUN_DIR IMAGES --out FILE.npz`")
    if model.get("dim") not in (None, embeddings.dim):
        raise ValueError(f"{file}: holds {embeddings.dim}-dimensional embeddings but says its model makes "
                         f"{model['dim']}-dimensional ones; the file is damaged")
    return embeddings, {"file": str(file), "sha256": file_sha256(file)}


def build_index(config: IndexBuildConfig) -> dict:
    """``normsoftmax index build``: path, count, kinds (and nlist, nprobe for IVF) of the new index.

    Building again from the same file with the same kind leaves the existing index as it is.
    """
    if not config.embeddings:
        raise ValueError("index build needs an embeddings file (written by `normsoftmax embed`)")
    if not config.out:
        raise ValueError("index build needs --out INDEX_DIR, the folder to create")
    embeddings, source = read_source(config.embeddings)
    out = Path(config.out).expanduser().resolve()
    if (out / METADATA_NAME).is_file():
        existing = SearchIndex.open(out)
        built_from = [earlier.get("sha256") for earlier in existing.metadata["sources"]]
        if existing.kind == config.kind and built_from == [source["sha256"]]:
            logger.info("%s already holds this index (built from %s); nothing to do", out, source["file"])
            return {**existing.describe(), "unchanged": True}
    ivf = None
    if config.kind == "ivf":
        ivf = choose_ivf_parameters(len(embeddings), embeddings.dim, config.nlist, config.nprobe, config.pq_m,
                                    config.train_size)
        logger.info("IVF-PQ: nlist %d, nprobe %d, %d sub-quantizers, trained on %d vectors", ivf.nlist, ivf.nprobe,
                    ivf.pq_m, ivf.train_count)
    index = SearchIndex.create(out, embeddings, config.kind, ivf=ivf, seed=config.seed, source=source)
    return index.describe()


def add_to_index(config: IndexAddConfig) -> dict:
    """``normsoftmax index add``: append an embeddings file of the same model; path and new count."""
    if not config.index or not config.embeddings:
        raise ValueError("index add needs the index folder and an embeddings file")
    index = SearchIndex.open(config.index)
    embeddings, source = read_source(config.embeddings)
    added = index.add(embeddings, source)
    return {**index.describe(), "added": len(added), "first_id": added.start}


def load_model_for(index: SearchIndex, checkpoint: str | os.PathLike | None, device):
    """The embedder of ``checkpoint`` (default: the one the index records), refused unless it is the model
    that embedded the index."""
    from ..checkpoint import load_embedder

    if checkpoint is None:
        checkpoint = (index.model or {}).get("checkpoint")
        if not checkpoint:
            raise ValueError(f"{index.directory} records no checkpoint; pass --checkpoint")
        if not Path(checkpoint).exists():
            raise FileNotFoundError(f"{checkpoint}: the checkpoint recorded in {index.directory} is gone; pass "
                                    f"--checkpoint with a copy of it (the same weights)")
    model = load_embedder(checkpoint, device)
    index.check_model(model)
    return model


def query_images(location: str | os.PathLike) -> list[str]:
    """An image file, or every image file under a folder (sorted)."""
    path = Path(location).expanduser().resolve()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not found:
            raise ValueError(f"{path}: no image files (extensions {', '.join(sorted(IMAGE_EXTENSIONS))})")
        return found
    raise FileNotFoundError(f"{path}: no such image file or folder")


def search_images(config: SearchConfig) -> list[dict]:
    """``normsoftmax index search``: per query image, its ``k`` nearest items (id, path, score, ...)."""
    from ..embedding.embed import embed_images
    from ..runtime import resolve_device

    if not config.index or not config.images:
        raise ValueError("index search needs the index folder and an image file or folder")
    index = SearchIndex.open(config.index)
    if config.kind not in index.kinds:
        raise ValueError(f"{index.directory} is a {index.kind} index: search it with --kind "
                         f"{' or '.join(index.kinds)}")
    paths = query_images(config.images)
    device = resolve_device(config.device)
    model = load_model_for(index, config.checkpoint, device)
    vectors = embed_images(model, paths, batch_size=config.batch_size, device=str(device), workers=config.workers,
                           amp=(index.model or {}).get("amp") or "auto")
    neighbours = index.search(vectors, config.k, config.kind, nprobe=config.nprobe)
    return [{"query": path, "kind": config.kind, "score": SCORE_NAMES[config.kind],
             "neighbours": index.hits(neighbours, row)} for row, path in enumerate(paths)]


__all__ = ["build_index", "add_to_index", "search_images", "load_model_for", "read_source", "query_images"]
