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
from adntn_deploy.runtime import params_file
from adntn_deploy.runtime.base import TensorInfo, requested_outputs, validate_feeds


#: inputs up to this size are always copied into their staging buffer: the copy costs less than asking numpy
#: for the address (``ndarray.ctypes``, about 1 us, several times that right after a call's kernels)
ALWAYS_STAGED_BYTES = 16 * 1024

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

        Memory: on CPU the parameters are read from the file straight into aligned buffers that the VM
        takes without a copy (:mod:`.params_file`; a 64 MiB dense VGG-16 fc7 peaked at +193 MiB while
        loading through safetensors' mapping and a TVM copy, +129 MiB so); on a GPU they are copied to the
        device one file entry at a time. The transform runs on a VM of its own with TVM's naive allocator:
        on the pooled allocator that ``main`` uses, every intermediate of the generators and the packing
        (each as big as a weight) stayed cached in the pool for the life of the process (the resident set
        after load was twice the weights: +129 MiB for that fc7, generated or dense, now +65 MiB).

        Raises:
            ArtifactError: the parameter file is not valid safetensors or lacks a parameter the manifest lists.
        """
        import tvm
        from safetensors import SafetensorError, safe_open

        path = self.path / self.manifest["params_file"]
        names = self.manifest["params"]
        # on CPU, read into aligned buffers that the VM takes without a copy: a stored dense weight is held
        # once while loading, not three times (mapped file, numpy copy, TVM copy)
        arrays = params_file.read_aligned(path, names) if self._on_cpu else None
        if arrays is not None:
            params = [tvm.runtime.from_dlpack(array) if array.size else tvm.runtime.tensor(array, self.device)
                      for array in arrays]  # an empty array has any address
            return self._transform(module, params)
        if not self._on_cpu:
            params_file.listed_entries(path, names)
        try:
            with safe_open(str(path), framework="numpy") as stored:
                params = [tvm.runtime.tensor(stored.get_tensor(name), self.device) for name in names]
        except SafetensorError as exc:  # its checksum matched: the writer produced a broken file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"{path} is not a readable safetensors file ({first}); rebuild the artifact "
                                "with adntn-deploy compile") from None
        return self._transform(module, params)

    def _transform(self, module, params: list) -> list:
        """``main_transform_params(params)`` on a VM of its own (naive allocator); ``params`` is emptied, so
        that the stored parameters are freed as soon as the weights exist."""
        from tvm import relax

        loader = relax.VirtualMachine(module, self.device, memory_cfg="naive")
        weights = list(loader["main_transform_params"](params))  # generators run here, once
        params.clear()
        del loader
        _return_freed_heap()
        return weights

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run on ``feeds`` ({input name: array}); returns {output name: array}.

        Raises:
            InputError: names, shapes or dtypes that do not match :attr:`inputs`, or unknown output names.
        """
        arrays = validate_feeds(self.inputs, feeds)
        wanted = requested_outputs(self.outputs, outputs) if outputs else None
        with self._lock:
            result = self._main(*self._device_inputs(arrays), *self._weights)
        values = [result] if hasattr(result, "numpy") else list(result)
        # on CPU, a copy through a DLPack view: 0.5 us against 4 us for Tensor.numpy()
        produced = {info.name: np.from_dlpack(v).copy() if self._on_cpu else v.numpy()
                    for info, v in zip(self.outputs, values)}
        return produced if wanted is None else {name: produced[name] for name in wanted}

    def _device_inputs(self, arrays: dict[str, np.ndarray]) -> list:
        """TVM tensors holding the validated inputs; the caller holds the lock (staging buffers are shared).

        On CPU an input over :data:`ALWAYS_STAGED_BYTES` aligned as TVM requires is passed without a copy, and
        any other is copied into a reused aligned buffer: allocating a fresh TVM tensor per call cost 10 us of
        a 72 us MLP call.
        """
        import tvm

        tensors = []
        for info in self.inputs:
            array = arrays[info.name]
            if not self._on_cpu or array.size == 0:
                tensors.append(tvm.runtime.tensor(array, self.device))
            elif (array.nbytes > ALWAYS_STAGED_BYTES and array.flags.writeable
                    and array.ctypes.data % params_file.ALIGNMENT == 0):
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

    array = params_file.aligned_empty(shape, dtype)
    return array, tvm.runtime.from_dlpack(array)
