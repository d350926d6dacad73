"""Datasets for training and compressing the zoo models (nothing is ever downloaded)."""

from adntn_deploy.data.datasets import DATASETS, DataError, Dataset, load_dataset

__all__ = ["DATASETS", "DataError", "Dataset", "load_dataset"]
