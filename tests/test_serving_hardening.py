"""The OIP server against hostile and careless clients: a real server process on loopback, real sockets.

Malformed requests get a JSON 4xx (never a 500 or a traceback), oversized bodies 413, slow clients are cut
off, health stays fast while big requests are decoded, non-finite outputs follow the documented rule, a model
that cannot run is refused at start, and the request decoder survives fuzzing.
"""

import http.client
import json
import math
import resource
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adntn_deploy.runtime import load
from processes import free_port, stop_group
from adntn_deploy.serving.protocol import DATATYPES, InferRequest, ProtocolError, decode_request

LIMIT = 20_000_000  # --max-request-bytes of the shared server: room for the 16 MiB bodies of the health test
TIMEOUT = 2.0  # --request-timeout of the shared server, seconds
CLI = [sys.executable, "-m", "adntn_deploy.cli.main"]


def _cap_memory():  # a wrong allocation in a server under test fails instead of swapping the machine
    resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))


class Server:
    """``adntn-deploy serve`` in its own process group with its stderr in a file; stopped with its children."""

    def __init__(self, path, log, *args):
        self.port = free_port()
        self.log = log
        self.proc = subprocess.Popen([*CLI, "serve", str(path), "--port", str(self.port), *map(str, args)],
                                     stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True,
                                     preexec_fn=_cap_memory)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_text()}")
            try:
                if self.request("GET", "/v2/health/ready")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become ready in 120 s")

    def log_text(self) -> str:
        with open(self.log) as f:
            return f.read()

    def request(self, method, path, body=None, headers=None, timeout=60):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read(), resp.headers  # case-insensitive
        finally:
            conn.close()

    def infer(self, payload, headers=None, model="clf"):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request("POST", f"/v2/models/{model}/infer", body, {"content-type": "application/json", **(headers or {})})

    def raw(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)

    def stop(self):
        stop_group(self.proc)


def read_response(sock: socket.socket, deadline_s: float = 30) -> tuple[int | None, bytes, float]:
    """(status or None, everything received until the server closed, seconds until it closed)."""
    start = time.monotonic()
    sock.settimeout(deadline_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    seconds = time.monotonic() - start
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    return status, data, seconds


@pytest.fixture(scope="module")
def reference(onnx_model):
    return load(onnx_model)


def run_while_probing(threads, probe, stop) -> list[float]:
    """Run ``threads`` to completion, then stop the health ``probe`` and return its latencies (seconds)."""
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.touch()
    return json.loads(probe.communicate(timeout=60)[0])


@pytest.fixture(scope="module")
def server(onnx_model, tmp_path_factory):
    srv = Server(onnx_model, tmp_path_factory.mktemp("logs") / "server.log", "--max-request-bytes", LIMIT,
                 "--request-timeout", TIMEOUT, "--keep-alive-timeout", 2)
    yield srv
    srv.stop()


def json_request(x: np.ndarray, **extra) -> dict:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}], **extra}


def binary_request(x: np.ndarray, **extra) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}], **extra}).encode()
    return header + x.astype("<f4").tobytes(), {"Inference-Header-Content-Length": str(len(header))}


GOOD = {"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}
BIN = {"name": "input", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 64}}


def _binary(header: dict, payload: bytes, length: str | None = None):
    text = json.dumps(header).encode()
    return text + payload, {"Inference-Header-Content-Length": length if length is not None else str(len(text))}


MALFORMED = [  # (body or (body, headers), message fragment)
    (b"[" * 100_000, "deeper than 64"),
    (b'{"inputs": [' + b'{"a": ' * 70 + b"1" + b"}" * 70 + b"]}", "deeper than 64"),
    ({"inputs": [{**GOOD, "shape": [0, 2**62], "data": []}]}, "declares more than"),
    ({"inputs": [{**GOOD, "shape": [2**40, 2**40], "data": []}]}, "declares more than"),
    ({"inputs": [{**GOOD, "shape": [1] * 40, "data": [0.5]}]}, "at most 32"),
    ({"inputs": [{**GOOD, "shape": [-1, 16]}]}, "non-negative integers"),
    ({"inputs": [{**GOOD, "shape": [1.0, 16.0]}]}, "non-negative integers"),
    ({"inputs": [{**GOOD, "shape": [True, 16]}]}, "non-negative integers"),
    ({"inputs": [GOOD], "parameters": [1, 2]}, "'parameters' must be an object"),
    ({"inputs": [GOOD], "parameters": "binary"}, "'parameters' must be an object"),
    ({"inputs": [{**GOOD, "parameters": 5}]}, "'parameters' must be an object"),
    ({"inputs": [GOOD], "outputs": [{"name": "logits", "parameters": []}]}, "'parameters' must be an object"),
    ({"inputs": [GOOD], "parameters": {"binary_data_output": "yes"}}, "true or false"),
    ({"inputs": {"name": "input"}}, "'inputs'"),
    ({"inputs": "input"}, "'inputs'"),
    ({"inputs": [{**GOOD, "datatype": ["FP32"]}]}, "not supported"),
    ({"inputs": [{**GOOD, "datatype": {"a": 1}}]}, "not supported"),
    ({"inputs": [{**GOOD, "data": ["1.5"] * 16}]}, "holds strings"),
    ({"inputs": [{**GOOD, "data": [True] * 16}]}, "holds true/false"),
    ({"inputs": [{**GOOD, "data": [None] * 16}]}, "holds nulls"),
    ({"inputs": [{**GOOD, "data": [{"v": 1}] * 16}]}, "holds objects"),
    ({"inputs": [{**GOOD, "data": [[0.5] * 16, 0.5]}]}, "must be (nested) lists"),
    ({"inputs": [{**GOOD, "datatype": "INT32", "data": [1.5] * 16}]}, "holds fractional numbers"),
    ({"inputs": [{**GOOD, "datatype": "UINT8", "data": [300] * 16}]}, "out of range for UINT8"),
    ({"inputs": [{**GOOD, "datatype": "INT64", "data": [2**70] * 16}]}, "out of range for INT64"),
    ({"inputs": [{**GOOD, "data": [1e300] * 16}]}, "out of range for FP32"),
    ({"inputs": [{**GOOD, "datatype": "BOOL", "data": [1] * 16}]}, "holds integers"),
    (b'{"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [NaN' + b", 0" * 15 + b"]}]}", "NaN is not a JSON number"),
    (b'{"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [-Infinity' + b", 0" * 15 + b"]}]}", "-Infinity is not"),
    (b'{"inputs": [{"name": "input", "shape": [1, ' + b"9" * 5000 + b'], "datatype": "FP32", "data": []}]}', "4300"),
    (b'{"inputs": [1], "id": "\xff\xfe\xfa"}', "UTF-8"),
    (b"\x00\x01\x02 not json", "malformed JSON"),
    (_binary({"inputs": [BIN]}, b"\0" * 64, "abc"), "must be an integer"),
    (_binary({"inputs": [BIN]}, b"\0" * 64, "9" * 5000), "must be an integer"),
    (_binary({"inputs": [BIN]}, b"\0" * 64, "0"), "between 1 and"),
    (_binary({"inputs": [BIN]}, b"\0" * 64, "100000"), "between 1 and"),
    (_binary({"inputs": [BIN]}, b"\0" * 32), "binary_data_size 64 does not match"),
    (_binary({"inputs": [{**BIN, "parameters": {"binary_data_size": 2**70}}]}, b"\0" * 64), "does not match"),
    (_binary({"inputs": [{**BIN, "parameters": {"binary_data_size": True}}]}, b"\0" * 64), "does not match"),
    (_binary({"inputs": [{**BIN, "parameters": {"binary_data_size": -64}}]}, b"\0" * 64), "does not match"),
    (_binary({"inputs": [BIN]}, b"\0" * 96), "32 bytes of binary data"),
]


@pytest.mark.parametrize("case, message", MALFORMED, ids=[f"{k}-{m[1][:24]}" for k, m in enumerate(MALFORMED)])
def test_malformed_requests_get_a_json_4xx(server, case, message):
    body, headers = case if isinstance(case, tuple) else (case, {})
    status, reply, _ = server.infer(body, headers)
    assert 400 <= status < 500, reply
    assert message in json.loads(reply)["error"], reply
    assert server.request("GET", "/v2/health/live")[0] == 200


def test_no_traceback_in_the_log(server):
    """Runs after the malformed table (module order): the log holds only one-line entries."""
    server.infer(b"[" * 100_000)
    server.infer({"inputs": [{**GOOD, "shape": [0, 2**62], "data": []}]})
    log = server.log_text()
    assert "Traceback" not in log and '"status": 500' not in log, log[-3000:]


def test_http_the_parser_rejects_gets_a_json_400(server):
    sock = server.raw()
    sock.sendall(b"POST /v2/models/clf/infer HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n")
    status, data, _ = read_response(sock)
    assert status == 400 and b'{"error": "invalid HTTP request' in data


def test_valid_requests_still_answer_correctly(server, reference):
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    expected = reference.run({"input": x})["logits"]
    status, reply, _ = server.infer(json_request(x, id="r1"))
    assert status == 200, reply
    out = json.loads(reply)
    assert out["id"] == "r1"
    np.testing.assert_allclose(np.array(out["outputs"][0]["data"]).reshape(3, 3), expected, rtol=1e-5, atol=1e-6)
    nested = json_request(x)
    nested["inputs"][0]["data"] = x.tolist()
    assert json.loads(server.infer(nested)[1])["outputs"][0]["data"] == out["outputs"][0]["data"]
    body, headers = binary_request(x, outputs=[{"name": "logits", "parameters": {"binary_data": True}}])
    status, reply, got_headers = server.infer(body, headers)
    split = int(got_headers["Inference-Header-Content-Length"])
    np.testing.assert_allclose(np.frombuffer(reply[split:], "<f4").reshape(3, 3), expected, rtol=1e-5, atol=1e-6)


def test_oversize_bodies_get_413(server):
    # declared: refused from the Content-Length alone, before a byte of body is read
    sock = server.raw()
    sock.sendall(b"POST /v2/models/clf/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000000000000\r\n\r\n")
    sock.settimeout(10)
    head = b""
    while b"}" not in head and (chunk := sock.recv(65536)):  # status line and JSON may come in two segments
        head += chunk
    assert head.startswith(b"HTTP/1.1 413") and b"exceeds the limit" in head, head
    sock.close()
    # chunked, no length: refused once the read passes the limit
    sock = server.raw()
    sock.sendall(b"POST /v2/models/clf/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
    try:
        for _ in range(LIMIT // (1 << 20) + 2):
            sock.sendall(piece)
    except OSError:
        pass  # the server may stop reading once it has answered
    status, data, _ = read_response(sock, 10)
    assert status == 413 and b'"error"' in data
    # an ordinary client sending a body over the limit reads its 413
    status, reply, _ = server.infer(b" " * (LIMIT + 1))
    assert status == 413 and "exceeds the limit" in json.loads(reply)["error"]


def test_non_finite_outputs_follow_the_documented_rule(server):
    x = np.full((2, 16), np.inf, np.float32)  # the model turns these into NaN
    body, headers = binary_request(x)
    status, reply, _ = server.infer(body, headers)
    assert status == 422 and b"NaN" not in reply.replace(b"NaN or Infinity", b"")
    assert '"binary_data_output": true' in json.loads(reply)["error"]
    for extra in ({"parameters": {"binary_data_output": True}},
                  {"outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}):
        body, headers = binary_request(x, **extra)
        status, reply, got_headers = server.infer(body, headers)
        assert status == 200 and got_headers["Content-Type"] == "application/octet-stream"
        split = int(got_headers["Inference-Header-Content-Length"])
        meta = json.loads(reply[:split])
        assert meta["outputs"][0]["parameters"]["binary_data_size"] == 24
        assert np.isnan(np.frombuffer(reply[split:], "<f4")).all()


def test_slow_body_gets_408_and_is_cut_off(server):
    sock = server.raw()
    sock.sendall(b"POST /v2/models/clf/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n")
    start = time.monotonic()
    sock.settimeout(0.25)
    data = b""
    while time.monotonic() - start < TIMEOUT + 5:
        try:
            sock.send(b" ")
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    seconds = time.monotonic() - start
    assert data.startswith(b"HTTP/1.1 408") and b"did not arrive within" in data, data
    assert seconds < TIMEOUT + 3


@pytest.mark.parametrize("trickle", [b"", b"POST /v2/models/clf/infer HTTP/1.1\r\nHost: x\r\n"])
def test_idle_and_slow_header_connections_are_closed(server, trickle):
    sock = server.raw()
    start = time.monotonic()
    closed = False
    for byte in trickle or [None] * 100:
        try:
            if byte is not None:
                sock.send(bytes([byte]))
            sock.settimeout(0.1)
            if sock.recv(1) == b"":
                closed = True
                break
        except socket.timeout:
            pass
        except OSError:
            closed = True
            break
        if time.monotonic() - start > TIMEOUT + 5:
            break
    assert closed and time.monotonic() - start < TIMEOUT + 3


def test_client_disconnect_is_one_log_line(server):
    sock = server.raw()
    sock.sendall(b"POST /v2/models/clf/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{\"inputs\": [")
    time.sleep(0.3)
    sock.close()
    deadline = time.time() + 10
    while '"status": 499' not in server.log_text() and time.time() < deadline:
        time.sleep(0.1)
    log = server.log_text()
    assert '"status": 499' in log and "Traceback" not in log and "ClientDisconnect" not in log


PROBE = """
import http.client, json, sys, time
port, stop_file = int(sys.argv[1]), sys.argv[2]
conn, lat = http.client.HTTPConnection("127.0.0.1", port, timeout=30), []
import os
while not os.path.exists(stop_file):
    t = time.perf_counter()
    conn.request("GET", "/v2/health/live")
    conn.getresponse().read()
    lat.append(time.perf_counter() - t)
    time.sleep(0.02)
print(json.dumps(lat))
"""


def probe_health(port, stop_file) -> subprocess.Popen:
    """A separate process times /v2/health/live every 20 ms: this process's own threads would skew the clock."""
    return subprocess.Popen([sys.executable, "-c", PROBE, str(port), str(stop_file)], stdout=subprocess.PIPE, text=True)


def p99(latencies) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def test_health_stays_fast_while_two_big_requests_are_decoded(server, reference, tmp_path):
    rows = 16 * 2**20 // (16 * 4)  # 16 MiB of "0.5," per body: seconds of JSON decoding each
    body = (b'{"inputs":[{"name":"input","shape":[%d,16],"datatype":"FP32","data":[' % rows
            + b"0.5," * (rows * 16 - 1) + b'0.5]}],"outputs":[{"name":"logits","parameters":{"binary_data":true}}]}')
    wrong = body.replace(b'"input"', b'"nope"', 1)
    stop = tmp_path / "stop"
    probe = probe_health(server.port, stop)
    time.sleep(0.5)
    results = {}

    def send(key, payload):
        results[key] = server.infer(payload)

    threads = [threading.Thread(target=send, args=("good", body)), threading.Thread(target=send, args=("wrong", wrong))]
    latencies = run_while_probing(threads, probe, stop)
    status, reply, headers = results["good"]
    assert status == 200, reply[:300]
    split = int(headers["Inference-Header-Content-Length"])
    expected = reference.run({"input": np.full((1, 16), 0.5, np.float32)})["logits"][0]
    got = np.frombuffer(reply[split:], "<f4").reshape(rows, 3)
    np.testing.assert_allclose(got[[0, -1]], [expected, expected], rtol=1e-5, atol=1e-6)
    assert results["wrong"][0] == 400 and "unknown ['nope']" in json.loads(results["wrong"][1])["error"]
    assert len(latencies) > 20 and p99(latencies) < 0.1, sorted(latencies)[-10:]


def test_a_full_queue_gets_503(onnx_model, tmp_path):
    srv = Server(onnx_model, tmp_path / "log", "--max-concurrency", 1, "--max-queue", 0, "--request-timeout", 10)
    try:
        holder = srv.raw()  # admitted, then holds its slot while its body trickles in
        holder.sendall(b"POST /v2/models/clf/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 200\r\n\r\n{")
        time.sleep(0.5)
        status, reply, _ = srv.infer({"inputs": [GOOD]})
        assert status == 503 and "busy" in json.loads(reply)["error"]
        holder.close()
        deadline = time.time() + 10
        while srv.infer({"inputs": [GOOD]})[0] != 200:
            assert time.time() < deadline
            time.sleep(0.1)
    finally:
        srv.stop()


def _onnx(path, nodes, inputs, outputs, initializers=()):
    import onnx
    from onnx import TensorProto, helper

    types = {"f": TensorProto.FLOAT, "i": TensorProto.INT64}
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(n, types[t], s) for n, t, s in inputs],
                              [helper.make_tensor_value_info(n, types[t], s) for n, t, s in outputs], list(initializers))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_serve_refuses_a_model_that_cannot_run(tmp_path):
    from onnx import helper, numpy_helper

    # loads fine, then every call must allocate a 2**20 x 2**20 fp32 weight (4 TiB)
    model = _onnx(tmp_path / "huge.onnx",
                  [helper.make_node("Expand", ["one", "wshape"], ["w"]),
                   helper.make_node("ReduceSum", ["w"], ["s"], keepdims=0),
                   helper.make_node("Add", ["input", "s"], ["output"])],
                  [("input", "f", ["batch", 4])], [("output", "f", ["batch", 4])],
                  [numpy_helper.from_array(np.array(1, np.float32), "one"),
                   numpy_helper.from_array(np.array([2**20, 2**20], np.int64), "wshape")])
    proc = subprocess.run([*CLI, "serve", str(model), "--port", str(free_port())], capture_output=True, text=True,
                          timeout=120, preexec_fn=_cap_memory)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "model huge version 1" in lines[0] and "cannot run" in lines[0], proc.stderr
    assert "--no-warmup" in lines[0] and "Traceback" not in proc.stderr


def test_a_runtime_failure_is_a_json_500_and_one_log_line(tmp_path):
    from onnx import helper

    # reshaping to a client-given shape: the warm-up passes ([0] copies the axis), a bad shape fails in the runtime
    model = _onnx(tmp_path / "reshape.onnx", [helper.make_node("Reshape", ["x", "s"], ["y"])],
                  [("x", "f", ["n"]), ("s", "i", ["k"])], [("y", "f", ["m"])])
    srv = Server(model, tmp_path / "log")
    try:
        status, reply, _ = srv.infer({"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]},
                                                 {"name": "s", "shape": [1], "datatype": "INT64", "data": [3]}]},
                                     model="reshape")
        assert status == 500 and "internal server error" in json.loads(reply)["error"]
        status, reply, _ = srv.infer({"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]},
                                                 {"name": "s", "shape": [2], "datatype": "INT64", "data": [2, 2]}]},
                                     model="reshape")
        assert status == 200 and json.loads(reply)["outputs"][0]["shape"] == [2, 2]
    finally:
        srv.stop()
    log = srv.log_text()
    ours = [line for line in log.splitlines() if '"status": 500' in line]
    assert len(ours) == 1 and '"error"' in ours[0] and "Traceback" not in log, log


# --- fuzzing the decoder -------------------------------------------------------------------------------

_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=6),
                          st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0, 1, -1, 0.5, 2**64]))
_json_values = st.recursive(_json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                   st.dictionaries(st.text(max_size=5), inner, max_size=4)),
                            max_leaves=20)
_datatypes = st.one_of(st.sampled_from(list(DATATYPES)), st.sampled_from([*DATATYPES, "BYTES", "fp32", ""]), _json_values)
_shapes = st.one_of(st.lists(st.integers(0, 4), max_size=3), st.lists(st.integers(-2, 5), max_size=4),
                    st.lists(st.sampled_from([0, 1, 2**31, 2**62, 2**80]), max_size=3), _json_values)
_data = st.one_of(st.lists(_json_scalars, max_size=12), st.lists(st.lists(st.integers(-3, 300), max_size=3), max_size=4),
                  st.lists(st.floats(width=32, allow_nan=False), max_size=8), _json_values)
_params = st.one_of(st.none(), st.fixed_dictionaries({}, optional={"binary_data_size": st.one_of(st.integers(-8, 80), _json_values)}),
                    _json_values)
_near_valid_inputs = st.fixed_dictionaries({"name": st.sampled_from(["input", "x"]), "shape": _shapes, "datatype": _datatypes},
                                           optional={"data": _data, "parameters": _params})
_inputs = st.one_of(_near_valid_inputs, _near_valid_inputs, st.fixed_dictionaries(
    {}, optional={"name": st.sampled_from(["input", "x", ""]) | _json_values, "shape": _shapes, "datatype": _datatypes,
                  "data": _data, "parameters": _params}))
_outputs = st.lists(st.fixed_dictionaries({"name": st.sampled_from(["logits", "y"])},
                                          optional={"parameters": st.one_of(st.none(), st.fixed_dictionaries(
                                              {}, optional={"binary_data": _json_scalars}), _json_values)}), max_size=3)
_requests = st.fixed_dictionaries({}, optional={"inputs": st.lists(_inputs, max_size=3) | _json_values, "outputs": _outputs | _json_values,
                                                "id": st.text(max_size=4) | _json_values,
                                                "parameters": st.none() | _json_values | st.fixed_dictionaries(
                                                    {}, optional={"binary_data_output": _json_scalars})})


@st.composite
def _bodies(draw):
    """(body, Inference-Header-Content-Length) pairs: near-valid requests, garbage, cut or padded ones."""
    kind = draw(st.sampled_from(["request", "request", "binary", "bytes", "value", "mangled"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200)), draw(st.none() | st.text(max_size=8))
    if kind == "value":
        return json.dumps(draw(_json_values)).encode(), None
    request = draw(_requests)
    text = json.dumps(request).encode()
    if kind == "mangled":
        cut = draw(st.integers(0, len(text)))
        return text[:cut] + draw(st.binary(max_size=8)) + text[cut:], draw(st.none() | st.just(str(len(text))))
    if kind == "binary":
        tail = draw(st.binary(max_size=96))
        length = draw(st.sampled_from([str(len(text)), str(len(text) + 1), "0", "-3", "x", str(len(text) + len(tail) + 9)]))
        return text + tail, length
    return text, None


def _check(body, header):
    try:
        decoded = decode_request(body, header, max_tensor_bytes=1 << 20)
    except ProtocolError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert isinstance(decoded, InferRequest) and decoded.inputs
    for array in decoded.inputs.values():
        assert isinstance(array, np.ndarray) and array.dtype in DATATYPES.values() and array.nbytes <= 1 << 20


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_bodies())
def test_fuzz_decode_request_raises_protocol_error_or_decodes(case):
    _check(*case)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.lists(st.integers(0, 4), min_size=0, max_size=3), datatype=st.sampled_from(list(DATATYPES)),
       nested=st.booleans(), binary=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_fuzz_valid_requests_decode_exactly(shape, datatype, nested, binary, seed):
    """Requests built from a random array decode to that array (JSON flat or nested, and binary)."""
    dtype = DATATYPES[datatype]
    rng = np.random.default_rng(seed)
    if dtype.kind == "b":
        array = rng.integers(0, 2, shape).astype(bool)
    elif dtype.kind == "f":
        array = rng.standard_normal(shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    item = {"name": "x", "shape": list(shape), "datatype": datatype}
    if binary:
        item["parameters"] = {"binary_data_size": array.nbytes}
        text = json.dumps({"inputs": [item]}).encode()
        decoded = decode_request(text + array.astype(dtype.newbyteorder("<")).tobytes(), str(len(text)))
    else:
        item["data"] = array.tolist() if nested and shape else array.ravel().tolist()
        decoded = decode_request(json.dumps({"inputs": [item]}).encode(), None)
    got = decoded.inputs["x"]
    assert got.dtype == dtype and got.shape == tuple(shape)
    np.testing.assert_array_equal(got, array)


# --- soak (the slow set) -------------------------------------------------------------------------------


@pytest.mark.slow
def test_soak_32_clients_for_60_s_with_bad_requests_mixed_in(onnx_model, reference, tmp_path):
    limit = 200_000  # oversized bodies of 200 kB: the point is refusing them, not the loopback's bandwidth
    server = Server(onnx_model, tmp_path / "log", "--max-request-bytes", limit, "--request-timeout", TIMEOUT)
    try:
        _soak(server, reference, tmp_path, limit)
    finally:
        server.stop()
    assert "Traceback" not in server.log_text()


def _soak(server, reference, tmp_path, limit):
    stop_at = time.monotonic() + 60
    counts = {"ok": 0, "wrong": 0, "4xx": 0, "5xx": 0, "other": 0}
    lock = threading.Lock()
    bad = [payload for payload, _ in MALFORMED[:12]] + [b"{not json", {"inputs": [{**GOOD, "data": ["1.5"] * 16}]}]

    def client(k):
        rng = np.random.default_rng(k)
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            try:
                if n % 10 == 0:  # oversized: declared and refused unread
                    status, _, _ = server.infer(b" " * (limit + 1))
                    key = "4xx" if status == 413 else ("5xx" if status >= 500 else "other")
                elif n % 5 == 0:
                    case = bad[(k + n) % len(bad)]
                    body, headers = case if isinstance(case, tuple) else (case, {})
                    status, _, _ = server.infer(body, headers)
                    key = "4xx" if 400 <= status < 500 else ("5xx" if status >= 500 else "other")
                else:
                    x = rng.standard_normal((int(rng.integers(1, 5)), 16)).astype(np.float32)
                    status, reply, _ = server.infer(json_request(x))
                    if status != 200:
                        key = "5xx" if status >= 500 else "other"
                    else:
                        got = np.array(json.loads(reply)["outputs"][0]["data"], np.float32).reshape(len(x), 3)
                        ok = np.allclose(got, reference.run({"input": x})["logits"], rtol=1e-5, atol=1e-6)
                        key = "ok" if ok else "wrong"
            except OSError:
                key = "other"
            with lock:
                counts[key] += 1

    stop = tmp_path / "stop"
    probe = probe_health(server.port, stop)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(32)]
    latencies = run_while_probing(threads, probe, stop)
    assert counts["wrong"] == 0 and counts["5xx"] == 0 and counts["other"] == 0, counts
    assert counts["ok"] > 1000 and counts["4xx"] > 100, counts
    assert p99(latencies) < 0.1, sorted(latencies)[-10:]
