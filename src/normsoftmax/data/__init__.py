"""Reading datasets into one common form: the records (:mod:`.records`), datasets by name
(:mod:`.registry`; the benchmarks in :mod:`.benchmarks`, users' folders and CSVs in :mod:`.custom`),
decoding and transforms (:mod:`.images`), the pre-resized image cache (:mod:`.cache`) and the
class-balanced sampler (:mod:`.sampler`)."""

from .records import DatasetError, DatasetRecords, ImageSet
from .registry import (
           DatasetSpec,
           dataset_spec,
           load_dataset,
           register_dataset,
           registered_datasets,
)

__all__ = ["DatasetError", "DatasetRecords", "ImageSet", "DatasetSpec", "dataset_spec", "load_dataset",
           "register_dataset", "registered_datasets"]
