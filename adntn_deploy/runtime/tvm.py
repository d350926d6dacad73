"""TVM runtime predictor for compiled artifacts (the same interface as the ONNX Runtime predictor).

Loading verifies the manifest and every file's sha256 (:mod:`adntn_deploy.compiler.artifact`), refuses
artifacts built for another CPU architecture or a device this machine lacks, then runs
``main_transform_params`` once (the generators produce their dense weights on this device) and keeps the
results for every call.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from adntn_deploy.compiler.artifact import LIFTED_MODES, read_manifest
from adntn_deploy.compiler.errors import ArtifactError
from adntn_deploy.compiler.profiles import host_arch
from adntn_deploy.compiler.target import configure_threads
from adntn_deploy.runtime.base import TensorInfo, requested_outputs, validate_feeds

_TVM_ALIGNMENT = 64  # bytes: TVM's kernels assume it and from_dlpack refuses anything less


#: library path -> sha256 of the file first loaded from it in this process
_loaded_libraries: dict[str, str] = {}
_load_lock = threading.Lock()


def _return_freed_heap() -> None:
    """Give the C heap's free memory back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), so after the
    first freed parameter the later ones and the intermediates of loading are carved from the heap, and
    freeing them keeps them resident: a 16 MiB layer stayed at 32 MiB after load without this.
    """
    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # None: not glibc (musl, macOS)
    except OSError:  # no C library to open by name (Windows)
        return
    if trim is not None:
        trim(0)


def _load_library(path: Path, sha256: str):
    """``tvm.runtime.load_module(path)``, correct when ``path`` now holds a different library.

    dlopen returns the library already loaded under the same file name, so an artifact recompiled into
    the same folder (compile replaces it in place) would run the old code in a long-lived process (a
    server, a notebook). A changed file is therefore loaded through a private copy with a unique name.
    """
    import shutil
    import tempfile

    import tvm

    key = str(path.resolve())
    with _load_lock:
        first = _loaded_libraries.setdefault(key, sha256)
        if first == sha256:
            return tvm.runtime.load_module(key)
        folder = tempfile.mkdtemp(prefix="adntn-lib-")
        copy = Path(folder) / f"{sha256[:16]}{path.suffix}"
        shutil.copyfile(path, copy)
        try:
            return tvm.runtime.load_module(str(copy))
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the mapping stays valid after the file is unlinked


class TvmPredictor:
    """Run a compiled artifact with the TVM runtime. ``run`` is thread-safe (calls are serialised).

    ``intra_op_threads`` sizes TVM's CPU thread pool (see :func:`configure_threads`; process-wide).

    Raises:
        ArtifactError: see :func:`read_manifest`; an artifact for another architecture or a missing GPU.
        ValueError: ``intra_op_threads`` below 1.
    """

    backend = "tvm"

    def __init__(self, path: str | os.PathLike, device_id: int = 0, intra_op_threads: int | None = None) -> None:
        self.threads = configure_threads(intra_op_threads)
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        arch = self.manifest["arch"]
        if arch != host_arch():
            raise ArtifactError(
                f"{self.path} was built for {arch} ({self.manifest.get('profile', 'unknown profile')}); this machine is {host_arch()}: copy it to "
                "the device and run it there (adntn_deploy/compiler/runner/README.md)"
            )
        import tvm
        from tvm import relax

        kind = self.manifest.get("device", "cpu")
        self.device = {"cpu": tvm.cpu, "cuda": tvm.cuda, "opencl": tvm.opencl}[kind](device_id)
        if not self.device.exist:
            raise ArtifactError(f"{self.path} needs a {kind} device, and this machine has none")
        library = self.manifest["library"]
        module = _load_library(self.path / library, self.manifest["files"][library]["sha256"])
        self.vm = relax.VirtualMachine(module, self.device)
        self._main = self.vm["main"]
        self._on_cpu = kind == "cpu"
        self._staging: dict[str, tuple] = {}
        self.inputs = tuple(TensorInfo(i["name"], tuple(i["shape"]), np.dtype(i["dtype"])) for i in self.manifest["inputs"])
        self.outputs = tuple(TensorInfo(o["name"], tuple(o["shape"]), np.dtype(o["dtype"])) for o in self.manifest["outputs"])
        self._lock = threading.Lock()
        self._weights: list = []
        if self.manifest["weights"] in LIFTED_MODES:
            self._weights = self._generate_weights(module)
        #: bytes of the weights held after load (generated, packed or streamed factors; folded constants are
        #: in the library and not counted)
        self.resident_weight_bytes = sum(int(np.prod(w.shape)) * np.dtype(str(w.dtype)).itemsize for w in self._weights)

    def _generate_weights(self, module) -> list:
        """Run ``main_transform_params`` once on the stored parameters: the weights every call takes.

        Memory: the parameters are copied to the device one file entry at a time (never the whole file
        twice), and the transform runs on a VM of its own with TVM's naive allocator. On the pooled
        allocator that ``main`` uses, every intermediate of the generators and the packing (each as big
        as a weight) stayed cached in the pool for the life of the process: the resident set after load
        was twice the weights (a 64 MiB VGG-16 fc7, generated or dense: +129 MiB, now +65 MiB).

        Raises:
            ArtifactError: the parameter file is not valid safetensors or lacks a parameter the manifest lists.
        """
        import tvm
        from safetensors import SafetensorError, safe_open
        from tvm import relax

        path = self.path / self.manifest["params_file"]
        try:
            with safe_open(str(path), framework="numpy") as stored:
                present = set(stored.keys())
                missing = [name for name in self.manifest["params"] if name not in present]
                if missing:
                    raise ArtifactError(f"{path} lacks the parameters {missing[:3]} that the manifest lists; rebuild the artifact")
                params = [tvm.runtime.tensor(stored.get_tensor(name), self.device) for name in self.manifest["params"]]
        except SafetensorError as exc:  # its checksum matched: the writer produced a broken file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"{path} is not a readable safetensors file ({first}); rebuild the artifact "
                                "with adntn-deploy compile") from None
        loader = relax.VirtualMachine(module, self.device, memory_cfg="naive")
        weights = list(loader["main_transform_params"](params))  # generators run here, once
        del params, loader
        _return_freed_heap()
        return weights

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run on ``feeds`` ({input name: array}); returns {output name: array}.

        Raises:
            InputError: names, shapes or dtypes that do not match :attr:`inputs`, or unknown output names.
        """
        arrays = validate_feeds(self.inputs, feeds)
        names = [o.name for o in self.outputs]
        wanted = requested_outputs(self.outputs, outputs)
        with self._lock:
            result = self._main(*self._device_inputs(arrays), *self._weights)
        values = [result] if hasattr(result, "numpy") else list(result)
        # on CPU, a copy through a DLPack view: 0.5 us against 4 us for Tensor.numpy()
        produced = {name: np.from_dlpack(v).copy() if self._on_cpu else v.numpy() for name, v in zip(names, values)}
        return {name: produced[name] for name in wanted}

    def _device_inputs(self, arrays: dict[str, np.ndarray]) -> list:
        """TVM tensors holding the validated inputs; the caller holds the lock (staging buffers are shared).

        On CPU an input aligned as TVM requires is passed without a copy, and any other is copied into a
        reused aligned buffer: allocating a fresh TVM tensor per call cost 10 us of a 72 us MLP call.
        """
        import tvm

        tensors = []
        for info in self.inputs:
            array = arrays[info.name]
            if not self._on_cpu or array.size == 0:
                tensors.append(tvm.runtime.tensor(array, self.device))
            elif array.ctypes.data % _TVM_ALIGNMENT == 0 and array.flags.writeable:
                tensors.append(tvm.runtime.from_dlpack(array))  # a view: ``arrays`` keeps it alive over the call
            else:
                staged = self._staging.get(info.name)
                if staged is None or staged[0].shape != array.shape:
                    staged = self._staging[info.name] = _aligned_buffer(array.shape, array.dtype)
                np.copyto(staged[0], array)
                tensors.append(staged[1])
        return tensors


def _aligned_buffer(shape: tuple[int, ...], dtype: np.dtype):
    """(numpy array, TVM tensor viewing the same memory) of ``shape`` and ``dtype``, aligned for TVM."""
    import tvm

    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    raw = np.empty(count * dtype.itemsize + _TVM_ALIGNMENT, np.uint8)
    offset = (-raw.ctypes.data) % _TVM_ALIGNMENT
    array = raw[offset:offset + count * dtype.itemsize].view(dtype).reshape(shape)
    return array, tvm.runtime.from_dlpack(array)
