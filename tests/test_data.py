"""Datasets: the IDX reader on real gzip files, the fixed split, clear errors for missing / corrupt data."""

import gzip
import struct

import numpy as np
import pytest

from adntn_deploy.data import DATASET_NAMES, DATASETS, DataError, load_dataset
from adntn_deploy.data.datasets import DEFAULT_FASHION_DIR, VALIDATION_SIZE, _read_idx


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion(folder, n_train=5100, n_test=20):
    rng = np.random.default_rng(0)
    write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(folder / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, n_train))
    write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, n_test))
    return folder


def test_fashion_reader_splits_and_normalises(tmp_path):
    data = load_dataset("fashion-mnist", fake_fashion(tmp_path))
    assert data.describe() == {"name": "fashion-mnist", "train": 5100 - VALIDATION_SIZE, "val": VALIDATION_SIZE, "test": 20}
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    both = np.concatenate([data.train_x.numpy().ravel(), data.val_x.numpy().ravel()])
    assert abs(both.mean()) < 1e-3 and abs(both.std() - 1) < 1e-3
    again = load_dataset("fashion-mnist", tmp_path)  # the split is fixed
    assert (again.val_y == data.val_y).all() and (again.val_x == data.val_x).all()


@pytest.mark.parametrize("damage, message", [
    ("missing", "apt-get install dataset-fashion-mnist"),
    ("truncated", "truncated"),
    ("not-gzip", "not a readable gzip IDX"),
    ("bad-magic", "bad magic"),
])
def test_fashion_bad_files_give_one_clear_error(tmp_path, damage, message):
    fake_fashion(tmp_path)
    target = tmp_path / "train-images-idx3-ubyte.gz"
    if damage == "missing":
        target.unlink()
    elif damage == "truncated":
        with gzip.open(target, "rb") as f:
            data = f.read()
        with gzip.open(target, "wb") as f:
            f.write(data[:1000])
    elif damage == "not-gzip":
        target.write_bytes(b"hello")
    else:
        with gzip.open(target, "wb") as f:
            f.write(b"\x00\x00\x0d\x03" + b"\x00" * 20)
    with pytest.raises(DataError, match=message):
        load_dataset("fashion-mnist", tmp_path)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")


def test_digits_is_builtin_and_28x28():
    data = load_dataset("digits")
    assert data.input_shape == (1, 28, 28)
    assert len(data.train_y) + len(data.val_y) + len(data.test_y) == 1797


@pytest.mark.skipif(not (DEFAULT_FASHION_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist (bash scripts/bootstrap.sh does)")
def test_real_fashion_mnist_labels():
    labels = _read_idx(DEFAULT_FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and np.bincount(labels).tolist() == [1000] * 10


def test_the_cli_s_dataset_names_are_the_loaders():
    # the command line offers DATASET_NAMES without importing the loaders (and torch)
    assert sorted(DATASET_NAMES) == sorted(DATASETS)
