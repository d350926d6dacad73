"""Write a KServe InferenceService (serving.kserve.io/v1beta1) for an ONNX model, with the repository it serves.

``package_kserve`` writes ``OUT/repository/`` (the Triton model repository of :mod:`.triton`, which
``adntn-deploy serve`` reads too) and ``OUT/<name>.yaml``, an InferenceService whose predictor is either

- ``runtime="adntn"``: this project's Docker image as a custom predictor container (``kserve-container``)
  running ``adntn-deploy serve /mnt/models --host 0.0.0.0 --port 8080`` (Open Inference Protocol v2 over
  HTTP; ``STORAGE_URI`` makes KServe's storage initializer put the repository at /mnt/models), or
- ``runtime="triton"``: KServe's ``kserve-tritonserver`` runtime (model format ``triton``, protocol v2),
  whose ``tritonserver --model-store=/mnt/models`` also answers HTTP on port 8080.

Either way the storage URI names the repository folder (the one holding ``<model>/config.pbtxt``), the
container gets readiness and liveness probes on ``/v2/health/ready`` and ``/v2/health/live`` (port 8080),
and its memory request and limit are the model's measured peak resident memory times a headroom factor
(:data:`MEMORY_HEADROOM`, 1.5 by default): the peak is read after loading the model with ONNX Runtime
(:func:`adntn_deploy.runtime.load`) and running it once on zeros, in a fresh Python process
(:func:`measure_peak_memory`). Requests and limits are both written, because KServe fills a missing limit
with its cluster default (2Gi memory, 1 CPU), which would be below a larger request.

The YAML is written by a small emitter here (:func:`to_yaml`): packaging needs no YAML library.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from adntn_deploy.errors import ServingError
from adntn_deploy.outputs import OutputError, refuse_overwriting_inputs

API_VERSION = "serving.kserve.io/v1beta1"
RUNTIMES = ("adntn", "triton")
#: the tag the Dockerfile's ``docker build -t adntn-deploy .`` gives (``:latest``); push it where the cluster pulls
DEFAULT_IMAGE = "adntn-deploy:latest"
#: CPU request and limit (Kubernetes quantity): one core; the server sizes its thread pool to the cgroup's CPUs
DEFAULT_CPU = "1"
#: memory request = measured peak RSS x this factor (batches bigger than the measured one, allocator slack)
MEMORY_HEADROOM = 1.5
#: the port KServe routes to (its convention for predictors; kserve-tritonserver's --http-port)
PORT = 8080
#: where KServe's storage initializer puts the storage URI's contents in the predictor container
MODEL_MOUNT = "/mnt/models"
TRITON_RUNTIME = "kserve-tritonserver"
#: storage URI schemes KServe's storage initializer (or PVC mount, or modelcar) resolves to a folder
STORAGE_SCHEMES = ("s3", "gs", "pvc", "https", "http", "hdfs", "webhdfs", "oci")
#: the default storage: a PersistentVolumeClaim of this name, one folder per InferenceService
DEFAULT_PVC = "adntn-models"

_ISVC_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # KServe's IsvcNameFmt
_ISVC_NAME_MAX = 53  # 63 (a DNS label) minus "-predictor", which KServe appends for its Service names
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")  # a PVC name
_CPU = re.compile(r"(\d+(\.\d{1,3})?|\d+m)")
_MIB = 1 << 20


@dataclass(frozen=True)
class KServePackage:
    """What :func:`package_kserve` wrote: the manifest, the repository folder and its model folder, the
    storage URI the manifest names (``storage_default``: it is the default, not one the caller gave), the
    measured peak resident memory (bytes) and the memory request written (a Kubernetes quantity)."""

    manifest: Path
    repository: Path
    model_folder: Path
    storage_uri: str
    storage_default: bool
    peak_bytes: int
    memory: str


_PROBE = r"""
import json, resource, sys


def peak_bytes():
    # VmHWM: the peak of this process's own memory; ru_maxrss also counts the parent's RSS at fork (Linux
    # keeps the larger high-water mark across exec), which would charge the caller's memory to the model
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


try:
    import numpy as np
    import adntn_deploy.cli.main  # what the image's entry point imports before serving
    try:
        import adntn_deploy.serving.app, uvicorn
    except ImportError:  # packaging on a machine without the serve extra
        pass
    from adntn_deploy.runtime import load
    predictor = load(sys.argv[1], backend="ort")
    feeds = {i.name: np.zeros(tuple(d if isinstance(d, int) and d >= 0 else 1 for d in i.shape), dtype=i.dtype)
             for i in predictor.inputs}
    predictor.run(feeds)
except Exception as exc:
    text = str(exc).strip()
    print(json.dumps({"error": (text.splitlines()[0] if text else type(exc).__name__)[:400]}))
    sys.exit(1)
print(json.dumps({"peak_bytes": peak_bytes()}))
"""


def measure_peak_memory(model: str | os.PathLike, timeout: float = 600.0) -> int:
    """Peak resident memory, in bytes, of a fresh Python process that imports what ``adntn-deploy serve``
    imports, loads ``model`` (an .onnx file) with ONNX Runtime (:func:`adntn_deploy.runtime.load`) and runs
    it once on zeros of its input shapes (symbolic axes set to 1, as ``serve``'s warm-up does).

    The number includes the interpreter and the libraries the server imports (ONNX Runtime, numpy, the HTTP
    and gRPC stacks: about 80 MB on x86-64 Linux), which the serving container pays too. It is the process's ``VmHWM``
    (``ru_maxrss`` where /proc is missing); ``timeout`` is in seconds.

    Raises:
        ServingError: ``model`` is not a file, the model cannot be loaded or run (the loader's message, one
            line), or the measurement took longer than ``timeout``.
    """
    path = Path(model)
    if not path.is_file():
        raise ServingError(f"model file {path} does not exist (or is not a file): give an .onnx file")
    # the probe imports this package from where this process found it (an installed copy or a checkout)
    home = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (home, os.environ.get("PYTHONPATH")) if p)}
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise ServingError(f"measuring the memory of {path} took over {timeout:g} s; "
                           "is the model too big for this machine?") from None
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    try:
        answer = json.loads(last)
    except ValueError:
        answer = {}
    if proc.returncode != 0 or "peak_bytes" not in answer:
        why = answer.get("error") or (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise ServingError(f"cannot load and run {path} to measure its memory: {why}")
    return int(answer["peak_bytes"])


def memory_request(peak_bytes: int, headroom: float = MEMORY_HEADROOM) -> str:
    """The memory request for a container whose measured peak is ``peak_bytes`` (bytes): ``peak_bytes x
    headroom`` rounded up to whole MiB, as a Kubernetes quantity ("123Mi").

    Raises:
        ServingError: ``peak_bytes`` not positive, or ``headroom`` below 1.
    """
    if peak_bytes <= 0:
        raise ServingError(f"a measured peak of {peak_bytes} bytes cannot size a memory request")
    if not headroom >= 1:
        raise ServingError(f"memory_headroom= {headroom} must be at least 1 (the request must hold the measured peak)")
    return f"{math.ceil(peak_bytes * headroom / _MIB)}Mi"


def check_storage_uri(uri: str) -> str:
    """``uri`` if KServe can fetch a model repository folder from it; the scheme is one of
    :data:`STORAGE_SCHEMES` (``s3://bucket/path``, ``gs://...``, ``pvc://CLAIM/path``, ``https://...`` to a
    .tar.gz/.zip of the repository, ``hdfs://``, ``webhdfs://``, ``oci://`` modelcar images).

    Raises:
        ServingError: another scheme, no scheme, no location after it, white space, or a PVC name that
            is not a Kubernetes name.
    """
    match = re.fullmatch(r"([a-z][a-z0-9+.-]*)://(.*)", uri or "")
    if not match:
        raise ServingError(f"storage_uri= {uri!r} is not a URI: give one of "
                           f"{', '.join(s + '://' for s in STORAGE_SCHEMES)} (e.g. s3://bucket/models/clf)")
    scheme, rest = match.groups()
    if scheme not in STORAGE_SCHEMES:
        raise ServingError(f"storage_uri= {uri!r} has scheme {scheme}://, which KServe cannot serve a repository "
                           f"from: use one of {', '.join(s + '://' for s in STORAGE_SCHEMES)}")
    if not rest.strip("/") or re.search(r"\s", rest):
        raise ServingError(f"storage_uri= {uri!r} names no location (or holds white space): "
                           f"e.g. {scheme}://{'claim' if scheme == 'pvc' else 'bucket'}/models/clf")
    if scheme == "pvc":
        claim = rest.split("/", 1)[0]
        if len(claim) > 253 or not _DNS_SUBDOMAIN.fullmatch(claim):
            raise ServingError(f"storage_uri= {uri!r}: {claim!r} is not a PersistentVolumeClaim name "
                               "(lowercase letters, digits, '-' and '.')")
    return uri


def isvc_name(model_name: str) -> str:
    """The InferenceService name for model ``model_name``: lowercased, with '_' and '.' turned into '-'.

    Raises:
        ServingError: the result is not a KServe name (a letter first, then lowercase letters, digits and
            '-', not ending in '-', at most 53 characters).
    """
    candidate = model_name.lower().replace("_", "-").replace(".", "-")
    if not _ISVC_NAME.fullmatch(candidate) or len(candidate) > _ISVC_NAME_MAX:
        raise ServingError(f"name= {model_name!r} cannot name an InferenceService (KServe wants a letter first, "
                           f"then lowercase letters, digits and '-', at most {_ISVC_NAME_MAX} characters): "
                           "give another name=")
    return candidate


def check_cpu(cpu: str) -> str:
    """``cpu`` if it is a Kubernetes CPU quantity (cores as "2" or "0.5", or millicores as "500m") above 0.

    Raises:
        ServingError: anything else.
    """
    text = str(cpu).strip()
    if not _CPU.fullmatch(text) or float(text.rstrip("m") or 0) == 0:
        raise ServingError(f"cpu= {cpu!r} is not a CPU quantity: give cores (1, 0.5) or millicores (500m)")
    return text


def _probes() -> dict:
    """Readiness and liveness probes on the v2 health routes: the server answers them once its models are
    loaded (it loads before binding), so liveness allows a slow start before failing."""
    return {
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": PORT}, "initialDelaySeconds": 5,
                           "periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": PORT}, "initialDelaySeconds": 30,
                          "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6},
    }


def inference_service(name: str, runtime: str, storage_uri: str, memory: str, cpu: str = DEFAULT_CPU,
                      image: str = DEFAULT_IMAGE) -> dict:
    """The InferenceService manifest (a dict of plain JSON values) for the repository at ``storage_uri``.

    ``name`` is the InferenceService name, ``runtime`` one of :data:`RUNTIMES`, ``memory`` and ``cpu``
    Kubernetes quantities used as both request and limit; ``image`` is used by the ``adntn`` runtime only.

    Raises:
        ServingError: an unknown ``runtime``, a bad ``storage_uri``, ``cpu`` or name, or an empty ``image``.
    """
    if runtime not in RUNTIMES:
        raise ServingError(f"runtime= {runtime!r} must be one of {', '.join(RUNTIMES)}")
    if not _ISVC_NAME.fullmatch(name or ""):
        raise ServingError(f"{name!r} is not an InferenceService name (lowercase letters, digits and '-')")
    check_storage_uri(storage_uri)
    cpu = check_cpu(cpu)
    resources = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}
    if runtime == "adntn":
        if not image or re.search(r"\s", image):
            raise ServingError(f"image= {image!r} must be an image reference such as "
                               "registry.example.com/adntn-deploy:0.1.0")
        predictor = {"containers": [{
            "name": "kserve-container",
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "args": ["serve", MODEL_MOUNT, "--host", "0.0.0.0", "--port", str(PORT)],
            "env": [{"name": "STORAGE_URI", "value": storage_uri}, {"name": "PROTOCOL", "value": "v2"}],
            "ports": [{"containerPort": PORT, "protocol": "TCP"}],
            **_probes(),
            "resources": resources,
        }]}
    else:
        predictor = {"model": {
            "modelFormat": {"name": "triton"},
            "runtime": TRITON_RUNTIME,
            "protocolVersion": "v2",
            "storageUri": storage_uri,
            **_probes(),
            "resources": resources,
        }}
    return {
        "apiVersion": API_VERSION,
        "kind": "InferenceService",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "adntn-deploy"}},
        "spec": {"predictor": predictor},
    }


_PLAIN = re.compile(r"[A-Za-z_/]([A-Za-z0-9_./@+:-]*[A-Za-z0-9_./@+-])?")  # no ": ", no ":" at the end
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return ".nan" if math.isnan(value) else ".inf" if value > 0 else "-.inf"
        mantissa, _, exponent = repr(value).partition("e")
        mantissa += "" if "." in mantissa else ".0"  # YAML 1.1 readers need the dot
        return mantissa + (f"e{'' if exponent[0] in '+-' else '+'}{exponent}" if exponent else "")
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text)  # a JSON string is a YAML double-quoted scalar


def _leaf(value) -> str:
    """A scalar, or an empty dict or list, on one line."""
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)


def to_yaml(value, indent: int = 0) -> str:
    """Block-style YAML for ``value`` (dicts, lists, str, int, float, bool, None), in insertion order.

    Strings that YAML would read as another type or that hold special characters are double-quoted.
    """
    pad = " " * indent
    lines = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{_scalar(key)}:")
                lines.append(to_yaml(item, indent + (2 if isinstance(item, dict) else 0)))
            else:
                lines.append(f"{pad}{_scalar(key)}: {_leaf(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, (dict, list)) and item:
                body = to_yaml(item, indent + 2)
                lines.append(f"{pad}- {body[indent + 2:]}")
            else:
                lines.append(f"{pad}- {_leaf(item)}")
    else:
        lines.append(pad + _scalar(value))
    return "\n".join(lines)


def package_kserve(model: str | os.PathLike, output: str | os.PathLike, name: str | None = None,
                   runtime: str = "adntn", storage_uri: str | None = None, image: str = DEFAULT_IMAGE,
                   cpu: str = DEFAULT_CPU, memory_headroom: float = MEMORY_HEADROOM, max_batch_size: int = 32,
                   max_queue_delay_us: int = 0, version: int = 1, timeout: float = 600.0) -> KServePackage:
    """Write ``output/repository/`` (the Triton repository of ``model``, an .onnx file) and
    ``output/<name>.yaml``, an InferenceService that serves it (see the module docstring).

    ``name`` is the model name (default: the file's stem; the InferenceService name is derived from it,
    :func:`isvc_name`); ``storage_uri`` where the repository will be uploaded (default
    ``pvc://adntn-models/<isvc name>``); ``memory_headroom`` multiplies the measured peak memory (bytes,
    :func:`measure_peak_memory`, whose ``timeout`` is in seconds); ``max_batch_size``, ``max_queue_delay_us``
    and ``version`` go to the Triton repository (:func:`.triton.package_triton`).

    Everything is checked and measured before anything is written.

    Raises:
        ServingError: a missing or unreadable model (the loader's message), a bad runtime, storage URI, CPU
            quantity, image, headroom or name.
        OutputError: the manifest exists already (it is not overwritten), or the repository refuses the model
            (:func:`adntn_deploy.serving.triton.package_triton`).
    """
    from adntn_deploy.serving.triton import _write_new_file, package_triton

    source = Path(model)
    if not source.is_file():
        raise ServingError(f"model file {source} does not exist (or is not a file): give an .onnx file")
    model_name = name or source.stem
    service = isvc_name(model_name)
    storage_default = storage_uri is None
    uri = f"pvc://{DEFAULT_PVC}/{service}" if storage_default else storage_uri
    out = Path(output)
    manifest_path = out / f"{service}.yaml"
    repository = out / "repository"
    refuse_overwriting_inputs(out, source, option="output=")
    if os.path.lexists(manifest_path):
        raise OutputError(f"{manifest_path} exists and is not overwritten; give another output= or delete it")
    inference_service(service, runtime, uri, "1Mi", cpu, image)  # check every option before the measurement
    memory_request(1, memory_headroom)
    peak = measure_peak_memory(source, timeout=timeout)
    memory = memory_request(peak, memory_headroom)
    manifest = inference_service(service, runtime, uri, memory, cpu, image)
    out.mkdir(parents=True, exist_ok=True)
    folder = package_triton(source, repository, name=model_name, max_batch_size=max_batch_size, version=version,
                            max_queue_delay_us=max_queue_delay_us)
    how = (f"custom predictor {image} running adntn-deploy serve" if runtime == "adntn"
           else f"KServe's {TRITON_RUNTIME} runtime")
    header = (f"# KServe InferenceService for model {model_name!r}, written by adntn-deploy package --format kserve:\n"
              f"# {how}, Open Inference Protocol v2 on port {PORT}.\n"
              f"# Upload the contents of {repository.name}/ (beside this file) to {uri} (so that "
              f"{uri.rstrip('/')}/{model_name}/config.pbtxt exists), then: kubectl apply -f {manifest_path.name}\n"
              f"# memory = {memory_headroom:g} x the measured peak RSS ({peak / _MIB:.0f} MiB: the server's imports "
              f"and the model in ONNX Runtime, batch 1)\n")
    _write_new_file(manifest_path, header + to_yaml(manifest) + "\n")
    return KServePackage(manifest_path, repository, folder, uri, storage_default, peak, memory)
