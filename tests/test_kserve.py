"""``package --format kserve``: InferenceService manifests checked against KServe's CRD schema (no cluster),
the measured peak memory behind their requests, and one-line errors for bad input.

The schema is the v1beta1 openAPIV3Schema of KServe's InferenceService CRD, vendored in tests/data/kserve
(its README names the source). Kubernetes prunes unknown fields instead of failing on them, and kubectl's
strict field validation refuses them; the validator here does the latter: every object schema that lists
properties and allows no others is closed.
"""

import copy
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from adntn_deploy.errors import ServingError
from adntn_deploy.serving.kserve import (
    MEMORY_HEADROOM, check_cpu, check_storage_uri, inference_service, isvc_name, measure_peak_memory,
    memory_request, to_yaml,
)

jsonschema = pytest.importorskip("jsonschema")  # the kserve extra
yaml = pytest.importorskip("yaml")

SCHEMA = Path(__file__).parent / "data" / "kserve" / "inferenceservice-v1beta1.schema.json.gz"
MIB = 1 << 20


def _closed(schema):
    """``schema`` with ``additionalProperties: false`` on every object that lists properties and neither allows
    others nor preserves unknown fields (kubectl --validate=strict)."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def validator():
    schema = _closed(json.loads(gzip.decompress(SCHEMA.read_bytes())))
    return jsonschema.Draft4Validator(schema)  # OpenAPI v3.0 schemas are a JSON Schema draft-4 dialect


def schema_errors(validator, manifest) -> list[str]:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]
    # the CRD's identity, which the API server matches before the schema applies
    if (manifest.get("apiVersion"), manifest.get("kind")) != ("serving.kserve.io/v1beta1", "InferenceService"):
        errors.append("apiVersion/kind: not an InferenceService of serving.kserve.io/v1beta1")
    name = manifest.get("metadata", {}).get("name", "")
    if not isinstance(name, str) or not name or len(name) > 63:
        errors.append(f"metadata/name: {name!r} is not a Kubernetes name")
    return errors


def dense_onnx(path: Path, n_in: int, n_out: int) -> Path:
    """A one-MatMul model, input (N, n_in) float32 -> (N, n_out): n_in * n_out * 4 bytes of weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((n_in, n_out)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["logits"])], "dense",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_out])],
        [numpy_helper.from_array(weight, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"small": 16x3 weights (192 bytes), "big": 2048x2048 weights (16 MiB)} as .onnx files."""
    folder = tmp_path_factory.mktemp("kserve_models")
    return {"small": dense_onnx(folder / "small.onnx", 16, 3), "big": dense_onnx(folder / "big.onnx", 2048, 2048)}


@pytest.fixture(scope="module")
def peaks(models):
    return {size: measure_peak_memory(path) for size, path in models.items()}


# --- end to end: the command, the manifest against the schema, the repository ---------------------------------

@pytest.mark.parametrize("runtime, extra, storage_uri", [
    ("adntn", [], "pvc://adntn-models/small"),  # the default storage
    ("triton", ["--storage-uri", "s3://models/prod/small", "--cpu", "500m", "--max-queue-delay-us", "250"],
     "s3://models/prod/small"),
])
def test_package_writes_a_valid_inferenceservice(tmp_path, cli_runner, validator, models, peaks, runtime, extra,
                                                 storage_uri):
    from adntn_deploy.serving.repository import discover

    out = tmp_path / "k8s"
    result = cli_runner("package", models["small"], "--format", "kserve", "-o", out, "--runtime", runtime, *extra)
    assert result.exit_code == 0, result.output
    assert f"upload the contents of {out / 'repository'}/ to {storage_uri}" in result.output
    assert ("the default: a PersistentVolumeClaim" in result.output) == (not extra)
    text = (out / "small.yaml").read_text()
    assert text.startswith("# KServe InferenceService")
    manifest = yaml.safe_load(text)
    assert schema_errors(validator, manifest) == []
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1" and manifest["kind"] == "InferenceService"
    assert manifest["metadata"]["name"] == "small"

    predictor = manifest["spec"]["predictor"]
    if runtime == "adntn":
        (container,) = predictor["containers"]
        assert container["name"] == "kserve-container" and container["image"] == "adntn-deploy:latest"
        assert container["args"] == ["serve", "/mnt/models", "--host", "0.0.0.0", "--port", "8080"]
        assert {"name": "STORAGE_URI", "value": storage_uri} in container["env"]
        assert {"name": "PROTOCOL", "value": "v2"} in container["env"]
    else:
        container = predictor["model"]
        assert container["modelFormat"] == {"name": "triton"} and container["runtime"] == "kserve-tritonserver"
        assert container["storageUri"] == storage_uri and container["protocolVersion"] == "v2"
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    # the measurement runs in a fresh process: within a few MiB of the fixture's own measurement
    memory = container["resources"]["requests"]["memory"]
    assert abs(int(memory[:-2]) - peaks["small"] * MEMORY_HEADROOM / MIB) < 16, (memory, peaks["small"])
    cpu = "500m" if extra else "1"
    assert container["resources"] == {"requests": {"cpu": cpu, "memory": memory},
                                      "limits": {"cpu": cpu, "memory": memory}}

    (entry,) = discover(out / "repository")  # what `serve /mnt/models` and Triton's --model-store read
    assert (entry.name, entry.version) == ("small", "1")
    config = (out / "repository" / "small" / "config.pbtxt").read_text()
    # a dynamic first axis: Triton's dynamic batcher, waiting as long as --max-queue-delay-us says
    assert f"dynamic_batching {{\n  max_queue_delay_microseconds: {250 if extra else 0}\n}}" in config


# the validator has teeth: each mistake is refused by the schema
@pytest.mark.parametrize("mistake, path", [
    (lambda m: m["spec"]["predictor"]["containers"][0].update(readinesProbe={}), "containers/0"),  # typo
    (lambda m: m["spec"]["predictor"]["containers"][0]["resources"]["requests"].update(memory="lots"), "memory"),
    (lambda m: m["spec"]["predictor"]["containers"][0]["livenessProbe"]["httpGet"].update(port=80.5), "httpGet"),
    (lambda m: m["spec"]["predictor"]["containers"][0]["ports"][0].update(containerPort="8080"), "containerPort"),
    (lambda m: m["spec"].update(predicter=m["spec"].pop("predictor")), "spec"),
    (lambda m: m.pop("kind"), "kind"),
])
def test_the_schema_refuses_broken_manifests(validator, mistake, path):
    manifest = inference_service("clf", "adntn", "s3://bucket/clf", "400Mi")
    assert schema_errors(validator, manifest) == []
    broken = copy.deepcopy(manifest)
    mistake(broken)
    errors = schema_errors(validator, broken)
    assert errors and any(path in e for e in errors), errors


@pytest.mark.parametrize("runtime", ["adntn", "triton"])
@pytest.mark.parametrize("uri", ["s3://b/m", "gs://b/m/", "pvc://claim.v1/models", "https://h/x/repo.tar.gz",
                                 "oci://registry.example.com/models:v1", "hdfs://nn/models"])
def test_every_runtime_and_storage_validate(validator, runtime, uri):
    manifest = inference_service("clf-2", runtime, uri, "1024Mi", cpu="2", image="registry.example.com/adntn:0.1")
    assert schema_errors(validator, manifest) == []
    assert yaml.safe_load(to_yaml(manifest)) == manifest


# --- the peak memory ----------------------------------------------------------------------------------------

def test_peak_memory_is_plausible_and_grows_with_the_model(peaks):
    # the server's imports (ONNX Runtime, numpy, the HTTP and gRPC stacks) cost about 80 MiB here; not the pytest process's memory
    assert 50 * MIB < peaks["small"] < 1024 * MIB, peaks
    # 16 MiB of weights: ONNX Runtime holds them at least once (the file's bytes and its own copy at load)
    assert peaks["big"] - peaks["small"] >= 16 * MIB, peaks
    small, big = (int(memory_request(peaks[s])[:-2]) for s in ("small", "big"))
    assert big > small >= peaks["small"] * MEMORY_HEADROOM / MIB


@pytest.mark.parametrize("peak, headroom, expected", [
    (100 * MIB, 1.5, "150Mi"), (1, 1.5, "1Mi"), (MIB + 1, 1.0, "2Mi"), (1000 * MIB, 2.0, "2000Mi"),
])
def test_memory_request(peak, headroom, expected):
    assert memory_request(peak, headroom) == expected


@pytest.mark.parametrize("peak, headroom, message", [
    (0, 1.5, "cannot size a memory request"), (MIB, 0.9, "memory_headroom= 0.9 must be at least 1"),
])
def test_memory_request_refuses(peak, headroom, message):
    with pytest.raises(ServingError, match=message):
        memory_request(peak, headroom)


# --- option checks ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("uri, message", [
    ("s3://bucket/models", None), ("pvc://adntn-models/clf", None), ("https://example.com/repo.tar.gz", None),
    ("ftp://host/models", "has scheme ftp://"), ("file:///models", "has scheme file://"),
    ("/data/models", "is not a URI"), ("s3:/bucket", "is not a URI"), ("s3://", "names no location"),
    ("s3://b/my models", "white space"), ("pvc://Bad_Claim/x", "not a PersistentVolumeClaim name"),
])
def test_storage_uri(uri, message):
    if message is None:
        assert check_storage_uri(uri) == uri
    else:
        with pytest.raises(ServingError, match=message):
            check_storage_uri(uri)


@pytest.mark.parametrize("model_name, expected", [
    ("clf", "clf"), ("Tiny_TTN.v2", "tiny-ttn-v2"), ("2clf", None), ("clf-", None), ("a" * 54, None),
])
def test_isvc_name(model_name, expected):
    if expected is None:
        with pytest.raises(ServingError, match="cannot name an InferenceService"):
            isvc_name(model_name)
    else:
        assert isvc_name(model_name) == expected


@pytest.mark.parametrize("cpu, ok", [("1", True), ("0.5", True), ("500m", True), ("0", False), ("lots", False),
                                     ("-1", False), ("1.5m", False)])
def test_cpu(cpu, ok):
    if ok:
        assert check_cpu(cpu) == cpu
    else:
        with pytest.raises(ServingError, match="is not a CPU quantity"):
            check_cpu(cpu)


def test_yaml_round_trips_tricky_values():
    value = {"strings": ["true", "No", "null", "~", "8080", "0.0.0.0", "1:20", "a: b", "x:", "#c", "a #b", "", "-",
                         "--port", "s3://b/m", "adntn:latest", "é", "'q'", '"d"', "line\nbreak", "*ref", "!tag"],
             "numbers": [0, -3, 1.5, 1e100, 2.5e-07, 10**20], "flags": [True, False, None], "empty": {"d": {}, "l": []},
             "nested": [{"a": [1, {"b": "c"}]}, [1, 2]]}
    assert yaml.safe_load(to_yaml(value)) == value


# --- bad input: one line, exit code 1, nothing written ------------------------------------------------------

@pytest.mark.parametrize("case, args, message", [
    ("missing", [], "model file {model} does not exist"),
    ("unreadable", [], "cannot load and run {model} to measure its memory: {model} is not a valid ONNX file"),
    ("ok", ["--storage-uri", "ftp://host/m"], "--storage-uri 'ftp://host/m' has scheme ftp://"),
    ("ok", ["--storage-uri", "models/clf"], "--storage-uri 'models/clf' is not a URI"),
    ("ok", ["--cpu", "lots"], "--cpu 'lots' is not a CPU quantity"),
    ("ok", ["--image", ""], "--image '' must be an image reference"),
    ("ok", ["--name", "9lives"], "--name '9lives' cannot name an InferenceService"),
])
def test_bad_input_is_one_line(tmp_path, cli_runner, models, case, args, message):
    model = {"missing": tmp_path / "nope.onnx", "unreadable": tmp_path / "junk.onnx", "ok": models["small"]}[case]
    if case == "unreadable":
        model.write_bytes(b"not an onnx file")
    out = tmp_path / "out"
    result = cli_runner("package", model, "--format", "kserve", "-o", out, *args)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("Error: " + message.format(model=model)), lines[0]
    assert not out.exists()


def test_an_existing_manifest_is_not_overwritten(tmp_path, cli_runner, models):
    out = tmp_path / "out"
    out.mkdir()
    (out / "small.yaml").write_text("mine\n")
    result = cli_runner("package", models["small"], "--format", "kserve", "-o", out)
    assert result.exit_code == 1 and "small.yaml exists and is not overwritten" in result.output
    assert (out / "small.yaml").read_text() == "mine\n" and not (out / "repository").exists()
