"""The KServe v2 gRPC endpoint, exercised with the stock tritonclient.grpc client against a real server process."""

import threading

import numpy as np
import pytest

from adntn_deploy.runtime import load
from adntn_deploy.serving.triton import package_triton
from test_serving import Server

grpcclient = pytest.importorskip("tritonclient.grpc", reason="pip install 'tritonclient[grpc]' (the test extra has it)")
from tritonclient.grpc import service_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory, onnx_model):
    """One server: the classifier as model "clf" (versions 1 and 2) over HTTP and gRPC, batching up to 16 rows."""
    from processes import free_port

    repo = tmp_path_factory.mktemp("grpc_repo")
    for version in (1, 2):
        package_triton(onnx_model, repo, name="clf", version=version)
    grpc_port = free_port()
    server = Server(repo, "--grpc-port", grpc_port, "--max-batch-size", 16, "--max-queue-delay-us", 2000)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    yield server, client
    client.close()
    server.stop()


def rows(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)


def infer(client, x, model="clf", datatype="FP32", **kwargs):
    tensor = grpcclient.InferInput("input", list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor], **kwargs)


def test_health_and_metadata(served, onnx_model):
    server, client = served
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("clf") and client.is_model_ready("clf", "1") and not client.is_model_ready("nope")
    assert client.get_server_metadata().name == "adntn-deploy"
    meta = client.get_model_metadata("clf")
    assert (meta.name, list(meta.versions), meta.platform) == ("clf", ["1", "2"], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 16])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("logits", "FP32", [-1, 3])]


@pytest.mark.parametrize("version", ["", "1"])
def test_infer_with_raw_contents_equals_a_local_run(served, onnx_model, version):
    server, client = served
    x = rows(3)
    result = infer(client, x, model_version=version, request_id="r7")
    expected = load(onnx_model).run({"input": x})["logits"]
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert (response.model_version, response.id) == (version or "2", "r7")


def test_infer_with_typed_contents(served, onnx_model):
    """A request built from the stock client's own messages, inputs as fp32_contents instead of raw bytes."""
    server, client = served
    x = rows(2, seed=1)
    request = service_pb2.ModelInferRequest(model_name="clf")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    response = client._client_stub.ModelInfer(request)
    out = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(tuple(response.outputs[0].shape))
    np.testing.assert_allclose(out, load(onnx_model).run({"input": x})["logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model, x, datatype, code, words", [
    ("nope", rows(1), "FP32", "NOT_FOUND", "unknown model 'nope'"),
    ("clf", rows(1)[:, :5], "FP32", "INVALID_ARGUMENT", "input 'input' has shape (1, 5)"),
    ("clf", rows(1).astype(np.float64), "FP64", "INVALID_ARGUMENT", "dtype float64"),
])
def test_errors_have_tritons_status_codes(served, model, x, datatype, code, words):
    server, client = served
    with pytest.raises(InferenceServerException) as err:
        infer(client, x, model=model, datatype=datatype)
    assert err.value.status() == f"StatusCode.{code}" and words in err.value.message()
    assert infer(client, rows(1)).as_numpy("logits").shape == (1, 3)  # and the server keeps serving


@pytest.mark.parametrize("mangle, words", [
    (lambda r: r.raw_input_contents.append(b"\0" * 4), "raw_input_contents has 2 entries for 1 inputs"),
    (lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 3), "has 3 bytes"),
    (lambda r: setattr(r.inputs[0], "datatype", "BYTES"), "datatype 'BYTES' is not supported"),
    (lambda r: r.inputs[0].shape.__setitem__(0, -2), "non-negative integers"),
])
def test_malformed_requests_get_invalid_argument(served, mangle, words):
    import grpc

    server, client = served
    request = service_pb2.ModelInferRequest(model_name="clf")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(rows(1).tobytes())
    mangle(request)
    with pytest.raises(grpc.RpcError) as err:
        client._client_stub.ModelInfer(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()


def test_bytes_that_are_no_message_get_invalid_argument(served):
    import grpc

    server, client = served
    call = client._channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpc.RpcError) as err:
        call(b"\xff\xff\xff\xff not protobuf")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed ModelInferRequest" in err.value.details()


def test_concurrent_grpc_and_http_requests_are_batched_and_answered_right(served, onnx_model):
    """32 concurrent clients (gRPC and HTTP) with 1-3 rows each: every answer equals a local run, and the
    server's metrics show runs of more than one request."""
    server, client = served
    predictor = load(onnx_model)
    answers, failures = {}, []

    def one(k):
        x = rows(1 + k % 3, seed=100 + k)
        try:
            if k % 2:
                got = infer(client, x).as_numpy("logits")
            else:
                status, body = server.infer("clf", {"inputs": [{"name": "input", "shape": list(x.shape),
                                                                  "datatype": "FP32", "data": x.ravel().tolist()}]})
                import json

                assert status == 200, body
                got = np.array(json.loads(body)["outputs"][0]["data"], np.float32).reshape(len(x), 3)
            answers[k] = (got, predictor.run({"input": x})["logits"])
        except Exception as exc:  # collected: an assert in a thread would be lost
            failures.append(repr(exc))

    threads = [threading.Thread(target=one, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures and len(answers) == 32
    for got, expected in answers.values():
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    metrics = server.get("/metrics")[1].decode()
    values = {line.split()[0]: float(line.split()[-1]) for line in metrics.splitlines() if not line.startswith("#")}
    runs, requests = values['adntn_batch_requests_count{model="clf"}'], values['adntn_batch_requests_sum{model="clf"}']
    assert requests >= 32 and runs < requests, f"{requests} requests in {runs} runs: none were merged"
    assert 'adntn_requests_total{model="clf",route="grpc",status="OK"}' in metrics


def test_serve_refuses_a_grpc_port_that_is_the_http_port(cli_runner, onnx_model):
    same = cli_runner("serve", onnx_model, "--port", 8123, "--grpc-port", 8123)
    assert same.returncode == 2 and "--grpc-port 8123 is the HTTP --port too" in same.stderr


@pytest.mark.parametrize("args, fix", [
    (("--port", "{taken}"), "pick another --port"),
    (("--port", "{taken}", "--workers", 2), "pick another --port"),
    (("--port", 0, "--grpc-port", "{taken}"), "pick another --grpc-port"),
    (("--host", "256.1.1.1", "--port", 0), "--host must be an address of this machine"),
    (("--host", "192.0.2.1", "--port", 0), "--host must be an address of this machine"),  # TEST-NET-1: not ours
])
def test_serve_refuses_an_address_it_cannot_use_before_announcing_it(cli_runner, onnx_model, args, fix):
    """One usage error naming the address and the flag to change, and no "serving ... on" line before it."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli_runner("serve", onnx_model, *(str(a).format(taken=port) for a in args))
    assert result.returncode == 2 and "cannot listen on " in result.stderr and fix in result.stderr
    assert "serving" not in result.stderr and "Traceback" not in result.stderr
