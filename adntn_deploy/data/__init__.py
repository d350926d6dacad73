"""Datasets for training and compressing the zoo models (nothing is ever downloaded).

The loaders need torch; the names do not. ``DATASET_NAMES`` is defined here so that the command line can
offer the choice without importing torch (about 3 s and 180 MiB: ``serve`` and ``--version`` need
neither); everything else is imported from :mod:`.datasets` on first use.
"""

from __future__ import annotations

from typing import Any

#: the datasets :func:`load_dataset` knows (tests check that its table has exactly these)
DATASET_NAMES = ("digits", "fashion-mnist")

#: names served from :mod:`.datasets`, imported on first use
_FROM_DATASETS = ("DATASETS", "DataError", "Dataset", "load_dataset")
__all__ = [*_FROM_DATASETS, "DATASET_NAMES"]


def __getattr__(name: str) -> Any:
    if name in _FROM_DATASETS:
        from adntn_deploy.data import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
