"""A dataset's evaluation protocol applied to a model: embed the evaluated splits, then rank.

Leave-one-out over ``test`` (CUB, Cars, SOP, folder/CSV), or ``query`` against ``gallery`` (In-Shop, CSV
with query/gallery splits); see :func:`normsoftmax.evaluation.metrics.evaluate_embeddings`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.images import ImageTransformConfig
from ..data.records import DatasetRecords
from ..embedding.embed import embed_dataset, eval_dataset
from .metrics import evaluate_embeddings, format_recall_lines, nmi_by_default


def evaluate_model(model: torch.nn.Module, records: DatasetRecords, transform: ImageTransformConfig, ks: list[int],
                   batch_size: int, device: torch.device, workers: int, amp: str = "none", channels_last: bool = False,
                   nmi: bool | None = None, cache=None, progress: bool = False, binary: bool = True,
                   dist=None) -> tuple[dict | None, dict | None]:
    """(evaluation object, embeddings by split) for the dataset's evaluation protocol.

    Under torchrun (``dist`` with several ranks) every rank embeds its contiguous share of each split, the
    shares are gathered on rank 0, which ranks them; the other ranks return ``(None, None)``.
    """
    sharded = dist is not None and dist.world_size > 1

    def embed(split):
        share = dist.shard(len(split)) if sharded else range(len(split))
        paths, labels = [split.paths[i] for i in share], split.labels[share.start:share.stop]
        dataset = eval_dataset(paths, labels, transform, cache, decode=records.decode)
        embeddings = embed_dataset(model, dataset, batch_size, device, workers, amp, channels_last,
                                   progress and (not sharded or dist.is_main))
        if not sharded:
            return embeddings
        shares = dist.gather(embeddings)
        return np.concatenate(shares) if dist.is_main else None

    if records.query_gallery:
        query_set, gallery_set = records.split("query"), records.split("gallery")
        query, gallery = embed(query_set), embed(gallery_set)
        if query is None or gallery is None:
            return None, None
        use_nmi = nmi if nmi is not None else nmi_by_default(query_set.num_classes)
        result = evaluate_embeddings(query_embeddings=query, query_labels=query_set.labels, gallery_embeddings=gallery,
                                     gallery_labels=gallery_set.labels, ks=ks, nmi=use_nmi, binary=binary,
                                     device=device)
        return result, {"query": query, "gallery": gallery}
    test_set = records.split("test")
    test = embed(test_set)
    if test is None:
        return None, None
    use_nmi = nmi if nmi is not None else nmi_by_default(test_set.num_classes)
    result = evaluate_embeddings(test, test_set.labels, ks=ks, nmi=use_nmi, binary=binary, device=device)
    return result, {"test": test}


def recall_report(result: dict) -> list[str]:
    """The reference README's lines: ``Raw Features: R@1, R@2, R@4, R@8: 65.36 & ...`` and ``Binary Features: ...``."""
    lines = format_recall_lines(result)
    return [f"Raw Features: {lines['float']}"] + ([f"Binary Features: {lines['binary']}"] if "binary" in lines else [])
