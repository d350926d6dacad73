"""TVM runtime predictor for compiled artifacts (same interface as the ONNX Runtime predictor).

Loading verifies the manifest and every file's sha256, refuses artifacts built for another CPU
architecture or a device this machine lacks, then runs ``main_transform_params`` once (the generators
produce their dense weights on this device) and keeps the results for every call.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from adntn_deploy.compiler.build import ARTIFACT_FORMAT, ARTIFACT_VERSION, LIFTED_MODES, sha256_file
from adntn_deploy.compiler.profiles import host_arch
from adntn_deploy.errors import GeneratorError
from adntn_deploy.runtime.base import TensorInfo, requested_outputs, validate_feeds


class ArtifactError(GeneratorError):
    """An artifact is missing, tampered with, or built for another machine."""


#: TVM's CPU thread pool reads its size from this variable (at each parallel launch)
THREADS_ENV = "TVM_NUM_THREADS"
_TVM_ALIGNMENT = 64  # bytes: TVM's kernels assume it and from_dlpack refuses anything less
_BIG_CORES = 1  # TVM's AffinityMode kBig, its default: on big.LITTLE boards, the big cores first


def configure_threads(threads: int | None = None) -> int:
    """Size TVM's CPU thread pool for this process and the processes it starts; returns the thread count.

    ``threads`` wins; else a ``TVM_NUM_THREADS`` the user set is kept; else the CPUs this process may use,
    the same default as our ONNX Runtime predictor. A given count above those CPUs is capped to them with a
    note on stderr (thousands of threads hung the pool). Why: TVM's own default on x86 is half the logical CPUs
    (it assumes two hyper-threads per core), which on a VM or container without SMT leaves half the cores
    idle -- measured 2.0x slower on a 32x4096x4096 dense layer on the 2-core host. The pool is
    process-wide, so the last call wins for every predictor in the process.

    Raises:
        ValueError: ``threads`` below 1.
    """
    from adntn_deploy.limits import cap_threads
    from adntn_deploy.runtime.ort import default_threads

    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        os.environ[THREADS_ENV] = str(cap_threads(threads, "threads"))
    else:
        given = os.environ.get(THREADS_ENV, "").strip()
        usable = given.isascii() and given.isdigit() and len(given) <= 9 and int(given) >= 1
        os.environ[THREADS_ENV] = str(cap_threads(int(given), THREADS_ENV) if usable else default_threads())
    count = int(os.environ[THREADS_ENV])
    import tvm  # noqa: F401 - loads the runtime library that registers the function below
    import tvm_ffi

    # parallel loops size themselves from the variable at each launch; the pool's own worker count (what
    # tvm.runtime.num_threads() reports) is fixed when it is first used unless reconfigured here
    tvm_ffi.get_global_func("runtime.config_threadpool")(_BIG_CORES, count)
    return count


#: library path -> sha256 of the file first loaded from it in this process
_loaded_libraries: dict[str, str] = {}
_load_lock = threading.Lock()


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


#: a manifest is a few KB; anything far larger is not one of ours and is not read into memory
MANIFEST_MAX_BYTES = 16 << 20
_DEVICES = ("cpu", "cuda", "opencl")
_DTYPES = ("float32", "float64", "float16", "int64", "int32", "int8", "uint8", "bool")
_HEX = frozenset("0123456789abcdef")


def _load_manifest_json(folder: Path) -> dict:
    """The parsed ``folder/manifest.json`` (size- and depth-bounded), without any check of its fields."""
    from adntn_deploy.safejson import JsonLimitError, loads_object

    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise ArtifactError(f"{folder} is not a compiled artifact (no manifest.json); build one with adntn-deploy compile")
    if manifest_path.stat().st_size > MANIFEST_MAX_BYTES:
        raise ArtifactError(f"{manifest_path} is larger than {MANIFEST_MAX_BYTES >> 20} MiB, so not a manifest this tool wrote; rebuild the artifact")
    try:
        return loads_object(manifest_path.read_bytes(), what=str(manifest_path))
    except JsonLimitError as exc:
        raise ArtifactError(f"{exc}; rebuild the artifact") from None


def contained_file(folder: Path, name: object, field: str) -> Path:
    """``folder / name`` for a manifest's file name that stays inside the artifact folder.

    A name must be a plain file name (no folder separators, not ``.`` or ``..``, not absolute); a
    symlink may not lead out of the folder. The file itself need not exist.

    Raises:
        ArtifactError: the name (quoted) and the manifest ``field`` it came from.
    """
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name)):
        raise ArtifactError(f"{folder}/manifest.json: {field} {name!r} is not a plain file name inside the artifact; "
                            "rebuild the artifact")
    path = folder / name
    if path.resolve().parent != folder.resolve():
        raise ArtifactError(f"{folder}/manifest.json: {field} {name!r} leads outside the artifact folder (a symlink); "
                            "rebuild the artifact")
    return path


def _check_tensors(folder: Path, manifest: dict, key: str) -> None:
    entries = manifest.get(key)
    bad = not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("name"), str) and e.get("dtype") in _DTYPES
        and isinstance(e.get("shape"), list)
        and all(d is None or (type(d) is int and d >= 0) for d in e["shape"]) for e in entries)
    if bad:
        raise ArtifactError(f"{folder}/manifest.json: {key!r} must list {{name, shape, dtype}} entries; rebuild the artifact")


def check_manifest(folder: str | os.PathLike, manifest: dict) -> None:
    """Check the fields of an artifact's manifest that loaders use, and that every name stays inside ``folder``.

    Format marker and version; ``files`` maps plain file names to {sha256, bytes}; ``library`` and (for
    lifted weights) ``params_file`` are listed there, so that every file the runtime loads is hashed;
    ``weights``, ``device``, ``arch``, ``params``, ``inputs`` and ``outputs`` have the types loaders expect.

    Raises:
        ArtifactError: the first problem, in one line.
    """
    from adntn_deploy.compiler.build import WEIGHT_MODES

    folder = Path(folder)
    where = f"{folder}/manifest.json"
    version = manifest.get("version")
    if manifest.get("format") != ARTIFACT_FORMAT or type(version) is not int or not 1 <= version <= ARTIFACT_VERSION:
        raise ArtifactError(f"{folder} has an unknown artifact format/version; rebuild it with this adntn-deploy")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{where}: 'files' must map the artifact's file names to their sha256; rebuild the artifact")
    for name, info in files.items():
        contained_file(folder, name, "files entry")
        if (not isinstance(info, dict) or not isinstance(info.get("sha256"), str) or len(info["sha256"]) != 64
                or not set(info["sha256"]) <= _HEX or type(info.get("bytes")) is not int or info["bytes"] < 0):
            raise ArtifactError(f"{where}: files entry {name!r} needs a sha256 (64 hex digits) and bytes; rebuild the artifact")
    weights = manifest.get("weights")
    if weights not in WEIGHT_MODES:
        raise ArtifactError(f"{where}: 'weights' must be one of {', '.join(WEIGHT_MODES)}; rebuild the artifact")
    loaded = [("library", manifest.get("library"))]
    if weights in LIFTED_MODES:
        loaded.append(("params_file", manifest.get("params_file")))
        params = manifest.get("params")
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            raise ArtifactError(f"{where}: 'params' must list the parameter names; rebuild the artifact")
    for field, name in loaded:
        contained_file(folder, name, field)
        if name not in files:
            raise ArtifactError(f"{where}: {field} {name!r} is not listed (with its sha256) in 'files'; rebuild the artifact")
    if manifest.get("device", "cpu") not in _DEVICES or not isinstance(manifest.get("arch"), str):
        raise ArtifactError(f"{where}: 'device' must be one of {', '.join(_DEVICES)} and 'arch' a name; rebuild the artifact")
    for key in ("inputs", "outputs"):
        _check_tensors(folder, manifest, key)


def read_manifest(path: str | os.PathLike, verify: bool = True) -> dict:
    """Read and check ``ARTIFACT/manifest.json`` (:func:`check_manifest`) and (by default) every file's sha256.

    The hashes detect accidents (a truncated copy, a file replaced by mistake), not a hostile publisher:
    whoever can write the files can write matching hashes (SECURITY.md).

    Raises:
        ArtifactError: no manifest, a malformed, oversized, too deeply nested or newer manifest, a name
            leading outside the folder, a loaded file not listed, a missing file, or a hash mismatch.
    """
    folder = Path(path)
    manifest = _load_manifest_json(folder)
    check_manifest(folder, manifest)
    if verify:
        for name, info in manifest["files"].items():
            file = folder / name
            if not file.is_file():
                raise ArtifactError(f"artifact file {file} is missing; rebuild the artifact")
            if sha256_file(file) != info["sha256"]:
                raise ArtifactError(f"artifact file {file} was modified (sha256 mismatch); rebuild it with adntn-deploy compile")
    return manifest


def is_artifact_dir(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is an artifact this tool wrote, safe to replace: a manifest that passes
    :func:`check_manifest`, and nothing in the folder but that manifest and the files it lists (hashes are
    not checked: an artifact with a damaged file is still ours to replace)."""
    from adntn_deploy.outputs import only_listed

    folder = Path(folder)
    try:
        manifest = _load_manifest_json(folder)
        check_manifest(folder, manifest)
    except ArtifactError:
        return False
    return only_listed(folder, {"manifest.json", *manifest["files"]})


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
            from safetensors.numpy import load_file

            stored = load_file(str(self.path / self.manifest["params_file"]))
            missing = [name for name in self.manifest["params"] if name not in stored]
            if missing:
                raise ArtifactError(f"{self.path / self.manifest['params_file']} lacks the parameters {missing[:3]} "
                                    "that the manifest lists; rebuild the artifact")
            params = [tvm.runtime.tensor(stored[name], self.device) for name in self.manifest["params"]]
            self._weights = list(self.vm["main_transform_params"](params))  # generators run here, once

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
