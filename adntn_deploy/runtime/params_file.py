"""An artifact's params file (safetensors) read straight into 64-byte-aligned numpy buffers.

Why not ``safetensors.safe_open``: it maps the file and copies each tensor out of the mapping, and TVM then
copies that array again into an aligned tensor of its own, so loading a stored dense layer held the weight
three times at its peak (the mapped file pages, the numpy copy, the TVM copy). Reading each tensor's bytes
with ``readinto`` into a buffer TVM can use without a copy (``tvm.runtime.from_dlpack``) holds it once.

The format: an 8-byte little-endian header length, a JSON header ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}}`` (offsets relative to the end of the header), then the raw data.
"""

from __future__ import annotations

import os
import struct
from typing import Sequence

import numpy as np

from adntn_deploy.compiler.errors import ArtifactError
from adntn_deploy.safejson import JsonLimitError, loads_object

#: bytes: TVM's kernels assume it, and ``tvm.runtime.from_dlpack`` refuses anything less
ALIGNMENT = 64
#: safetensors dtype codes that numpy holds natively (BF16 and the 8-bit floats are not among them)
NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
                "BOOL": np.bool_}
#: the most header bytes read (ours are a few KiB; the format's own readers cap it at 100 MB)
MAX_HEADER_BYTES = 100_000_000


def aligned_empty(shape: Sequence[int], dtype, alignment: int = ALIGNMENT) -> np.ndarray:
    """An uninitialised C-contiguous array of ``shape`` and ``dtype`` whose data starts on an ``alignment``-byte
    boundary (numpy itself guarantees 16). An empty array has no data, and numpy gives it any address."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(count * dtype.itemsize + alignment, np.uint8)
    offset = (-raw.ctypes.data) % alignment
    return raw[offset:offset + count * dtype.itemsize].view(dtype).reshape(tuple(shape))


def header(path: str | os.PathLike) -> tuple[dict, int]:
    """(the parsed JSON header, the byte offset where the data starts) of the safetensors file ``path``.

    Raises:
        ArtifactError: the file is shorter than its header says or the header is not a JSON object.
    """
    def unreadable(why: str) -> ArtifactError:
        return ArtifactError(f"{path} is not a readable safetensors file ({why}); rebuild the artifact with "
                             "adntn-deploy compile")

    with open(path, "rb") as stored:
        size = os.fstat(stored.fileno()).st_size
        prefix = stored.read(8)
        if len(prefix) < 8:
            raise unreadable("shorter than 8 bytes")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise unreadable(f"its header length {length} is past the end")
        try:
            return loads_object(stored.read(length), what="its header"), 8 + length
        except JsonLimitError as exc:
            raise unreadable(str(exc)) from None


def listed_entries(path: str | os.PathLike, names: Sequence[str]) -> tuple[dict, int]:
    """:func:`header` of the file, after checking that it has every tensor ``names`` lists.

    Raises:
        ArtifactError: as :func:`header`, or a listed name the file lacks.
    """
    entries, start = header(path)
    missing = [name for name in names if name not in entries]
    if missing:
        raise ArtifactError(f"{path} lacks the parameters {missing[:3]} that the manifest lists; rebuild the artifact")
    return entries, start


def read_aligned(path: str | os.PathLike, names: Sequence[str]) -> list[np.ndarray] | None:
    """The tensors ``names`` of the safetensors file ``path``, in that order, each read into its own
    :func:`aligned_empty` buffer: the file is never mapped and nothing is copied twice. None when one of
    them has a dtype numpy does not hold (BF16, 8-bit floats): read those with safetensors.

    Raises:
        ArtifactError: as :func:`listed_entries`; an entry whose dtype, shape and offsets disagree or point
            past the end of the file, or a file that ends early (the message names the file and the fix).
    """
    entries, start = listed_entries(path, names)
    if any(isinstance(entries[name], dict) and isinstance(entries[name].get("dtype"), str)
           and entries[name]["dtype"] not in NUMPY_DTYPES for name in names):
        return None
    size = os.path.getsize(path)
    arrays = []
    with open(path, "rb", buffering=0) as stored:
        for name in names:
            entry = entries[name]
            try:
                if not (isinstance(entry["shape"], list) and isinstance(entry["data_offsets"], list)):
                    raise ValueError
                dtype = np.dtype(NUMPY_DTYPES[entry["dtype"]])
                shape = [int(n) for n in entry["shape"]]
                begin, end = (int(n) for n in entry["data_offsets"])
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes or start + end > size:
                    raise ValueError
            except (KeyError, TypeError, ValueError):
                raise ArtifactError(f"{path}: the entry of tensor {name!r} is malformed (dtype, shape and data_offsets "
                                    "disagree or point past the end); rebuild the artifact") from None
            array = aligned_empty(shape, dtype)
            if nbytes:
                stored.seek(start + begin)
                view = memoryview(array.reshape(-1).view(np.uint8))
                done = 0
                while done < nbytes:  # a raw read may return less than asked
                    got = stored.readinto(view[done:])
                    if not got:
                        raise ArtifactError(f"{path} ends inside tensor {name!r}; rebuild the artifact")
                    done += got
            arrays.append(array)
    return arrays
