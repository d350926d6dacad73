"""Inputs for a predictor: arrays read from an ``.npz`` or ``.npy`` file (checked before they are read), or random ones."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from adntn_deploy.errors import AdntnError
from adntn_deploy.runtime.base import InputError


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, or the one array of an .npy file (named ``arr_0``, as ``numpy.savez(path, x)``
    names it), each array's declared shape and dtype checked before it is read.

    Refuses Python objects (no pickle) and arrays above the memory limit: a small compressed .npz can
    declare terabytes.

    Raises:
        InputError: neither a readable .npz nor .npy, a member that is not an array, or object arrays.
        LimitError: an array above the limit (:mod:`adntn_deploy.limits`).
    """
    import zipfile

    path = Path(path)
    arrays = {}
    try:
        with open(path, "rb") as f:
            if f.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
                f.seek(0)
                return {"arr_0": _read_array(f, "arr_0", path)}
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                name = member.filename[:-4] if member.filename.endswith(".npy") else None
                if name is None:
                    raise ValueError(f"member {member.filename!r} is not a .npy array")
                with archive.open(member) as f:
                    arrays[name] = _read_array(f, name, path)
    except AdntnError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"cannot read inputs from {path}: {str(exc)[:200]} "
                         f"(write them with numpy.savez, or numpy.save for a single input)") from None
    return arrays


_NPY_MAGIC = b"\x93NUMPY"


def _read_array(f, name: str, path: Path) -> np.ndarray:
    """One .npy array from the binary file ``f``: its header is read and checked (no Python objects, within the
    memory limit) before the data."""
    from numpy.lib import format as npy

    from adntn_deploy.limits import check_tensor

    start = f.tell()
    version = npy.read_magic(f)
    header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
    shape, _, dtype = header(f)
    if dtype.hasobject:
        raise ValueError(f"array {name!r} holds Python objects, which are never unpickled")
    check_tensor(f"array {name!r} in {path}", shape, dtype.itemsize)
    f.seek(start)
    return npy.read_array(f, allow_pickle=False)


def load_feeds(predictor: Any, path: str | os.PathLike | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for ``predictor``: the arrays of the .npz (or .npy) at ``path``, or standard-normal random inputs
    when None.

    Random inputs take each input's declared shape with symbolic axes set to 1 (batch 1) and its dtype,
    drawn from ``numpy.random.default_rng(seed)``. A .npy, or a .npz holding a single array, feeds a model with a
    single input whatever the array's name (``numpy.savez(path, x)`` names it arr_0). The arrays are not
    checked against the model here: :meth:`run` does that.

    Raises:
        InputError: see :func:`read_npz`.
        LimitError: a declared input or an array above the memory limit (:mod:`adntn_deploy.limits`).
    """
    from adntn_deploy.limits import check_tensor

    if path is None:
        rng = np.random.default_rng(seed)
        shapes = {i.name: [d if isinstance(d, int) else 1 for d in i.shape] for i in predictor.inputs}
        for i in predictor.inputs:  # drawn as float64, then cast
            check_tensor(f"random input {i.name!r}", shapes[i.name], max(8, np.dtype(i.dtype).itemsize))
        return {i.name: rng.standard_normal(shapes[i.name]).astype(i.dtype) for i in predictor.inputs}
    arrays = read_npz(path)
    if len(arrays) == 1 and len(predictor.inputs) == 1:  # a single unnamed array (arr_0) feeds the only input
        arrays = {predictor.inputs[0].name: next(iter(arrays.values()))}
    return arrays
