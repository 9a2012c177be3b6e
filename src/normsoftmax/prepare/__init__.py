"""Acquiring datasets: download (resumable, verified), safe extraction, verification against the published
counts, and the pre-resized image cache. :func:`prepare_dataset` is the ``normsoftmax prepare`` command."""

from .command import PrepareError, check_prepared, manual_instructions, prepare_dataset
from .download import ChecksumError, DownloadError, download
from .extract import ExtractionError, UnsafeArchiveError, extract_archive

__all__ = ["prepare_dataset", "check_prepared", "manual_instructions", "PrepareError", "download", "DownloadError",
           "ChecksumError", "extract_archive", "ExtractionError", "UnsafeArchiveError"]
