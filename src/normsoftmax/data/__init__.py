"""Reading datasets into one common form: the records (:mod:`.records`), datasets by name
(:mod:`.registry`; the benchmarks in :mod:`.benchmarks`, users' folders and CSVs in :mod:`.custom`),
decoding and transforms (:mod:`.images`), the pre-resized image cache (:mod:`.cache`) and the
class-balanced sampler (:mod:`.sampler`).

The built-in datasets are registered here, once, from an explicit list: the registry knows nothing of the
modules that define them, and any import of this package (``normsoftmax.data.registry`` included) has
them registered.
"""

from . import benchmarks, custom
from .records import DatasetError, DatasetRecords, ImageSet
from .registry import (
    DatasetSpec,
    dataset_spec,
    load_dataset,
    register_dataset,
    registered_datasets,
)

BUILTIN_DATASETS = (*benchmarks.SPECS, *custom.SPECS)
for _spec in BUILTIN_DATASETS:
    register_dataset(_spec)

__all__ = ["DatasetError", "DatasetRecords", "ImageSet", "DatasetSpec", "dataset_spec", "load_dataset",
           "register_dataset", "registered_datasets", "BUILTIN_DATASETS"]
