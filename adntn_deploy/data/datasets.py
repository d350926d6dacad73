"""Image-classification datasets as in-memory tensors, with a fixed validation split.

``fashion-mnist`` reads the gzip IDX files of the Debian package ``dataset-fashion-mnist``
(/usr/share/datasets/fashion-mnist/, or the folder in ``$ADNTN_DATA_DIR`` / the ``root`` argument):
60,000 training images, of which a fixed 5,000 (seeded permutation) are held out for validation, and the
10,000 test images. ``digits`` is scikit-learn's bundled 8x8 digits (1,797 images) resized to 28x28: a
tiny built-in stand-in for quick tests and for machines without the package.

Images are float32 (N, 1, 28, 28), normalised with the training set's mean and standard deviation;
labels are int64.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adntn_deploy.errors import AdntnError

DEFAULT_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz",
}
VALIDATION_SIZE = 5_000
SPLIT_SEED = 20_260_606  # fixed: the validation split never changes between runs or machines


class DataError(AdntnError):
    """A dataset is missing, unreadable or unknown."""


@dataclass
class Dataset:
    """Train / validation / test tensors of one dataset."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. (1, 28, 28)."""
        return tuple(self.train_x.shape[1:])

    @property
    def num_classes(self) -> int:
        """Number of label classes."""
        return len(self.classes)

    def describe(self) -> dict:
        """Sizes of the splits, JSON-ready."""
        return {"name": self.name, "train": len(self.train_y), "val": len(self.val_y), "test": len(self.test_y)}


def _read_idx(path: Path) -> np.ndarray:
    """Read one gzip IDX file (unsigned bytes) into an array of its stated shape."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable gzip IDX file ({exc}); reinstall it: apt-get install --reinstall dataset-fashion-mnist") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic); reinstall it: apt-get install --reinstall dataset-fashion-mnist")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} holds {body.size} values, its header says {dims}; the file is truncated: reinstall it")
    return body.reshape(dims)


def _split(x: torch.Tensor, y: torch.Tensor, val_size: int) -> tuple[torch.Tensor, ...]:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    val, train = order[:val_size], order[val_size:]
    return x[train], y[train], x[val], y[val]


def _normalise(train: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    mean, std = float(train.mean()), float(train.std()) or 1.0
    return [torch.from_numpy(((a - mean) / std).astype(np.float32)) for a in (train, *others)]


def load_fashion_mnist(root: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST from the IDX files in ``root`` (default ``$ADNTN_DATA_DIR`` or the Debian package's folder).

    Raises:
        DataError: a file is missing (the message names the package to install) or corrupt.
    """
    folder = Path(root or os.environ.get("ADNTN_DATA_DIR") or DEFAULT_FASHION_DIR)
    missing = [name for name in _FASHION_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found in {folder} (missing {missing[0]}): install it with "
            "'apt-get install dataset-fashion-mnist' (bootstrap.sh does), set ADNTN_DATA_DIR, or use --data digits"
        )
    arrays = {key: _read_idx(folder / name) for key, name in _FASHION_FILES.items()}
    if arrays["train_images"].shape[0] != arrays["train_labels"].shape[0] or arrays["test_images"].shape[0] != arrays["test_labels"].shape[0]:
        raise DataError(f"the image and label files in {folder} disagree on the number of examples; reinstall the package")
    train_x, test_x = _normalise(arrays["train_images"].astype(np.float32) / 255.0, arrays["test_images"].astype(np.float32) / 255.0)
    train_y = torch.from_numpy(arrays["train_labels"].astype(np.int64))
    test_y = torch.from_numpy(arrays["test_labels"].astype(np.int64))
    tx, ty, vx, vy = _split(train_x.unsqueeze(1), train_y, VALIDATION_SIZE)
    return Dataset("fashion-mnist", tx, ty, vx, vy, test_x.unsqueeze(1), test_y, FASHION_CLASSES)


def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits, bilinearly resized to 28x28; fixed 70 / 15 / 15 split.

    Raises:
        DataError: scikit-learn is not installed (``pip install adntn-deploy[data]``).
    """
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise DataError("the digits dataset needs scikit-learn: pip install 'adntn-deploy[data]'") from None
    bunch = sk_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = torch.nn.functional.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = n_val = len(labels) * 15 // 100
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    x = images.numpy()
    train_x, val_x, test_x = _normalise(x[train.numpy()], x[val.numpy()], x[test.numpy()])
    return Dataset("digits", train_x, labels[train], val_x, labels[val], test_x, labels[test], tuple(str(d) for d in range(10)))


DATASETS = {"fashion-mnist": load_fashion_mnist, "digits": load_digits}


def load_dataset(name: str, root: str | os.PathLike | None = None) -> Dataset:
    """Load dataset ``name`` ("fashion-mnist" or "digits"); ``root`` overrides Fashion-MNIST's folder.

    Raises:
        DataError: unknown name, or the dataset's files are missing or corrupt.
    """
    if name == "fashion-mnist":
        return load_fashion_mnist(root)
    if name in DATASETS:
        return DATASETS[name]()
    raise DataError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
