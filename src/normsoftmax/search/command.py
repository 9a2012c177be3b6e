"""The ``index build``, ``index add`` and ``index search`` commands: thin layers over :class:`SearchIndex`.

What they add to the Python API: reading an embeddings file and recording where it came from (path and
SHA-256, so a rebuild from the same file is a no-op and a second ``add`` of it is refused), and, for search,
loading the model that embedded the index and refusing any other one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..config import IndexAddConfig, IndexBuildConfig, IndexCompactConfig, IndexRemoveConfig, SearchConfig
from ..data.custom import IMAGE_EXTENSIONS
from ..embedding.files import EmbeddingsFile, read_embeddings
from ..files import file_sha256
from .backends import create_index, milvus_location, open_index
from .index import METADATA_NAME, SCORE_NAMES, SearchIndex, choose_ivf_parameters
from .milvus import is_milvus_location

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

    Building again from the same file with the same kind leaves the existing index as it is. The match
    thresholds of the model's run (its ``calibration.json``, same model) go with the index, or ``--calibration``.
    """
    if not config.embeddings:
        raise ValueError("index build needs an embeddings file (written by `normsoftmax embed`)")
    location = _build_location(config)
    embeddings, source = read_source(config.embeddings)
    if not is_milvus_location(location) and (Path(location) / METADATA_NAME).is_file():
        existing = SearchIndex.open(location)
        built_from = [earlier.get("sha256") for earlier in existing.metadata["sources"]]
        if existing.kind == config.kind and built_from == [source["sha256"]]:
            logger.info("%s already holds this index (built from %s); nothing to do", location, source["file"])
            return {**existing.describe(), "unchanged": True}
    ivf = None
    if config.kind == "ivf" and not is_milvus_location(location):
        ivf = choose_ivf_parameters(len(embeddings), embeddings.dim, config.nlist, config.nprobe, config.pq_m,
                                    config.train_size)
        logger.info("IVF-PQ: nlist %d, nprobe %d, %d sub-quantizers, trained on %d vectors", ivf.nlist, ivf.nprobe,
                    ivf.pq_m, ivf.train_count)
    digest = (embeddings.metadata.get("model") or {}).get("digest")
    calibration = _calibration_for(config.calibration, embeddings, digest)
    index = create_index(location, embeddings, config.kind, ivf=ivf, seed=config.seed, source=source,
                         calibration=calibration, milvus_index=config.milvus_index)
    return {**index.describe(), "calibration": (calibration or {}).get("file")}


def _build_location(config: IndexBuildConfig) -> str:
    if config.backend == "milvus":
        if not config.uri or not config.collection:
            raise ValueError("--backend milvus needs --uri (a Milvus server URL, or a local file for Milvus Lite) and "
                             "--collection NAME")
        return milvus_location(config.uri, config.collection)
    if not config.out:
        raise ValueError("index build needs --out INDEX_DIR, the folder to create (or --backend milvus)")
    return config.out if is_milvus_location(config.out) else str(Path(config.out).expanduser().resolve())


def _calibration_for(explicit: str | None, embeddings: EmbeddingsFile, digest: str | None) -> dict | None:
    from ..calibration import read_decisions, run_calibration_for

    if explicit:
        return read_decisions(explicit, digest)
    found = run_calibration_for((embeddings.metadata.get("model") or {}).get("checkpoint"), digest)
    if found:
        logger.info("the index carries the match thresholds of %s", found["file"])
    return found


def add_to_index(config: IndexAddConfig) -> dict:
    """``normsoftmax index add``: append an embeddings file of the same model; path and new count. A service
    using the index picks the new items up without a restart."""
    if not config.index or not config.embeddings:
        raise ValueError("index add needs the index and an embeddings file")
    index = open_index(config.index)
    embeddings, source = read_source(config.embeddings)
    added = index.add(embeddings, source)
    return {**index.describe(), "added": len(added), "first_id": added.start}


def remove_from_index(config: IndexRemoveConfig) -> dict:
    """``normsoftmax index remove``: remove items by id (durably); a service using the index sees it at once."""
    if not config.index or not config.ids:
        raise ValueError("index remove needs the index and the ids to remove")
    index = open_index(config.index)
    removed = index.remove(config.ids)
    return {**index.describe(), "removed": removed}


def compact_index(config: IndexCompactConfig) -> dict:
    """``normsoftmax index compact``: fold an index folder's journal into a new generation."""
    if not config.index:
        raise ValueError("index compact needs the index folder")
    index = SearchIndex.open(config.index)
    return index.compact()


def load_model_for(index, checkpoint: str | os.PathLike | None, device):
    """The embedder of ``checkpoint`` (default: the one the index records), refused unless it is the model
    that embedded the index."""
    from ..checkpoint import load_embedder

    if checkpoint is None:
        checkpoint = (index.model or {}).get("checkpoint")
        if not checkpoint:
            raise ValueError(f"{index.location} records no checkpoint; pass --checkpoint")
        if not Path(checkpoint).exists():
            raise FileNotFoundError(f"{checkpoint}: the checkpoint recorded in {index.location} is gone; pass "
                                    f"--checkpoint with a copy of it (the same weights)")
    model = load_embedder(checkpoint, device)
    index.check_model(model)
    return model


def match_thresholds(index, model, explicit: str | None = None) -> dict | None:
    """The thresholds that decide ``match``: ``explicit`` (a calibration.json), else the index's, else those of
    the model's run; each refused when it calibrates another model."""
    from ..calibration import read_decisions, run_calibration_for

    if explicit:
        return read_decisions(explicit, model.digest)
    carried = index.calibration
    if carried:
        if carried.get("digest") not in (None, model.digest):
            raise ValueError(f"{index.location} carries thresholds of model {str(carried.get('digest'))[:16]}, not of "
                             f"{str(model.digest)[:16]}")
        return carried
    return run_calibration_for(model.checkpoint, model.digest)


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
    """``normsoftmax index search``: per query image, its ``k`` nearest items (id, path, score, ...), and
    ``match`` per neighbour when thresholds are known (``--threshold``, or the calibration)."""
    from ..embedding.embed import embed_images
    from ..runtime import resolve_device

    if not config.index or not config.images:
        raise ValueError("index search needs the index and an image file or folder")
    index = open_index(config.index)
    if config.kind not in index.kinds:
        raise ValueError(f"{index.location} is a {index.kind} index: search it with --kind "
                         f"{' or '.join(index.kinds)}")
    paths = query_images(config.images)
    device = resolve_device(config.device)
    model = load_model_for(index, config.checkpoint, device)
    thresholds = match_thresholds(index, model, config.calibration)
    vectors = embed_images(model, paths, batch_size=config.batch_size, device=str(device), workers=config.workers,
                           amp=(index.model or {}).get("amp") or "auto")
    neighbours = index.search(vectors, config.k, config.kind, nprobe=config.nprobe)
    answers = []
    for row, path in enumerate(paths):
        hits = index.hits(neighbours, row)
        decided = decide(hits, config.kind, config.threshold, thresholds, index.dim)
        answers.append({"query": path, "kind": config.kind, "score": SCORE_NAMES[config.kind], **decided})
    return answers


def decide(hits: list[dict], kind: str, threshold: float | None, thresholds: dict | None, dim: int) -> dict:
    """``hits`` with ``match`` set, and the threshold used: the request's own, else the calibrated one; neither:
    no decision (``match`` left out). Binary thresholds are bit agreements, applied as Hamming distances."""
    from ..calibration.thresholds import binary_threshold_to_hamming

    source = "request"
    if threshold is None and thresholds and kind in thresholds:
        threshold, source = float(thresholds[kind]["threshold"]), thresholds.get("file") or "calibration"
    if threshold is None:
        return {"neighbours": hits}
    if kind == "binary":
        limit = binary_threshold_to_hamming(threshold, dim)
        decided = [{**hit, "match": hit["hamming"] <= limit} for hit in hits]
        return {"neighbours": decided, "threshold": threshold, "threshold_hamming": limit, "threshold_source": source}
    return {"neighbours": [{**hit, "match": hit["score"] >= threshold} for hit in hits], "threshold": threshold,
            "threshold_source": source}


__all__ = ["build_index", "add_to_index", "remove_from_index", "compact_index", "search_images", "load_model_for",
           "read_source", "query_images", "match_thresholds", "decide"]
