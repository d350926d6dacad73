"""runtime/params_file.py: an artifact's safetensors params read into aligned buffers, and the files it refuses."""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from adntn_deploy.compiler.errors import ArtifactError
from adntn_deploy.runtime import params_file

TENSORS = {
    "weight": np.arange(12, dtype=np.float32).reshape(3, 4),
    "half": np.array([1.5, -2.0], np.float16),
    "index": np.array([[7], [-9]], np.int64),
    "mask": np.array([True, False, True]),
    "bytes": np.arange(5, dtype=np.uint8),
    "scalar": np.array(3.25, np.float64),
    "empty": np.zeros((0, 4), np.float32),
}


def _raw(path, header: dict, data: bytes = b"", length: int | None = None) -> None:
    """A safetensors file written by hand: a header that the library's writer would refuse."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


@pytest.mark.parametrize("name", list(TENSORS))
def test_each_dtype_reads_back_aligned_and_writable(tmp_path, name):
    save_file(TENSORS, str(tmp_path / "p.safetensors"))
    (array,) = params_file.read_aligned(tmp_path / "p.safetensors", [name])
    np.testing.assert_array_equal(array, TENSORS[name])
    assert array.dtype == TENSORS[name].dtype and array.shape == TENSORS[name].shape
    assert array.flags.writeable and array.flags.c_contiguous
    assert array.size == 0 or array.ctypes.data % params_file.ALIGNMENT == 0  # an empty one has no data to align


def test_tensors_come_in_the_order_asked(tmp_path):
    save_file(TENSORS, str(tmp_path / "p.safetensors"))
    names = ["mask", "weight", "index"]
    got = params_file.read_aligned(tmp_path / "p.safetensors", names)
    for name, array in zip(names, got):
        np.testing.assert_array_equal(array, TENSORS[name])


@pytest.mark.parametrize("shape, dtype", [((3, 5), np.float32), ((7,), np.float16), ((), np.int64), ((1, 1), np.uint8)])
def test_aligned_empty(shape, dtype):
    array = params_file.aligned_empty(shape, dtype)
    assert array.shape == shape and array.dtype == dtype and array.ctypes.data % 64 == 0


@pytest.mark.parametrize("make, needle", [
    (lambda p: save_file({"a": np.ones(2, np.float32)}, str(p)), "lacks the parameters ['weight']"),
    (lambda p: _raw(p, {"weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, bytes(8)), "malformed"),
    (lambda p: _raw(p, {"weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)), "malformed"),
    (lambda p: _raw(p, {"weight": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 0]}}), "malformed"),
    (lambda p: _raw(p, {"weight": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, bytes(16)), "malformed"),
    (lambda p: _raw(p, {"weight": {"dtype": "F32", "shape": [4]}}, bytes(16)), "malformed"),
    (lambda p: _raw(p, {"weight": []}, bytes(16)), "malformed"),
    (lambda p: _raw(p, {"weight": {}}, length=10_000), "header length 10000 is past the end"),
    (lambda p: p.write_bytes(b"\x01\x00"), "shorter than 8 bytes"),
    (lambda p: p.write_bytes(struct.pack("<Q", 2) + b"[]"), "is not a JSON object"),
    (lambda p: p.write_bytes(struct.pack("<Q", 3) + b"{x}"), "is not valid JSON"),
])
def test_malformed_files_are_one_artifact_error(tmp_path, make, needle):
    path = tmp_path / "p.safetensors"
    make(path)
    with pytest.raises(ArtifactError, match="rebuild the artifact") as caught:
        params_file.read_aligned(path, ["weight"])
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_dtypes_numpy_lacks_are_left_to_safetensors(tmp_path):
    path = tmp_path / "p.safetensors"
    _raw(path, {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "BF16", "shape": [2], "data_offsets": [4, 8]}}, bytes(8))
    assert params_file.read_aligned(path, ["w"]) is not None
    assert params_file.read_aligned(path, ["w", "b"]) is None
    with pytest.raises(ArtifactError, match="lacks the parameters"):
        params_file.read_aligned(path, ["absent"])
