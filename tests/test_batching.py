"""Dynamic batching in process: merging, splitting, limits, failures and cancellation, on a fake model."""

import asyncio

import numpy as np
import pytest

from adntn_deploy.serving.batching import DynamicBatcher, batch_key


class Recorder:
    """A model computing 2x + row sum; records the rows of every call. Rows holding NaN make the call fail."""

    def __init__(self, delay=0.0, batch_axis=True):
        self.calls, self.delay, self.batch_axis = [], delay, batch_axis

    def __call__(self, feeds):
        import time

        x = feeds["x"]
        self.calls.append(len(x))
        time.sleep(self.delay)
        if np.isnan(x).any():
            raise ValueError("NaN input")
        out = {"y": 2 * x, "s": x.sum(axis=1)}
        if not self.batch_axis:
            out["total"] = np.float32(x.sum())
        return out


def run(coroutine):
    return asyncio.run(coroutine)


def feeds(n, value=1.0, width=4):
    return {"x": np.full((n, width), value, np.float32)}


async def submit_all(batcher, requests, stagger=0.0):
    async def one(k, f):
        await asyncio.sleep(k * stagger)
        return await batcher.submit(f)

    results = await asyncio.gather(*(one(k, f) for k, f in enumerate(requests)), return_exceptions=True)
    await batcher.close()
    return results


@pytest.mark.parametrize("sizes, max_batch, expected_runs", [
    ([1] * 8, 8, [8]),             # 8 single rows: one run
    ([1] * 8, 3, [3, 3, 2]),       # never more rows than max_batch_size
    ([2, 3, 1, 4], 5, [5, 5]),     # first fit in arrival order: 2+3, then 1+4
    ([9, 1], 4, [9, 1]),           # a request over the limit runs alone
])
def test_concurrent_requests_merge_up_to_the_limit_and_split_back(sizes, max_batch, expected_runs):
    model = Recorder()
    batcher = DynamicBatcher(model, max_batch, max_queue_delay=0.5)
    requests = [feeds(n, value=k) for k, n in enumerate(sizes)]
    results = run(submit_all(batcher, requests))
    assert sorted(model.calls) == sorted(expected_runs)
    for k, (request, result) in enumerate(zip(requests, results)):
        np.testing.assert_array_equal(result["y"], 2 * request["x"])
        np.testing.assert_array_equal(result["s"], np.full(len(request["x"]), 4 * k, np.float32))


def test_a_full_batch_runs_without_waiting_for_the_delay():
    model = Recorder()
    batcher = DynamicBatcher(model, 4, max_queue_delay=30.0)
    results = run(asyncio.wait_for(submit_all(batcher, [feeds(1)] * 4), 5))
    assert model.calls == [4] and len(results) == 4


def test_a_lone_request_waits_at_most_the_delay():
    model = Recorder()
    batcher = DynamicBatcher(model, 64, max_queue_delay=0.05)
    result = run(asyncio.wait_for(submit_all(batcher, [feeds(1)]), 5))
    assert model.calls == [1] and result[0]["y"].shape == (1, 4)


def test_requests_of_different_shapes_are_not_merged():
    model = Recorder()
    batcher = DynamicBatcher(model, 8, max_queue_delay=0.2)
    results = run(submit_all(batcher, [feeds(1, width=4), feeds(1, width=5), feeds(1, width=4)]))
    assert sorted(model.calls) == [1, 2] and [r["y"].shape for r in results] == [(1, 4), (1, 5), (1, 4)]


def test_a_failing_batch_fails_only_the_bad_request():
    model = Recorder()
    batcher = DynamicBatcher(model, 8, max_queue_delay=0.2)
    results = run(submit_all(batcher, [feeds(1), feeds(2, value=np.nan), feeds(1)]))
    assert isinstance(results[1], ValueError) and "NaN" in str(results[1])
    assert results[0]["y"].shape == (1, 4) and results[2]["y"].shape == (1, 4)
    assert model.calls[0] == 4 and sorted(model.calls[1:]) == [1, 1, 2]  # merged run failed, then one by one


def test_outputs_without_a_batch_axis_are_computed_per_request():
    model = Recorder(batch_axis=False)
    batcher = DynamicBatcher(model, 8, max_queue_delay=0.2)
    results = run(submit_all(batcher, [feeds(1, value=1), feeds(2, value=2)]))
    assert [float(r["total"]) for r in results] == [4.0, 16.0]


def test_busy_instances_let_requests_pile_up_into_bigger_batches():
    """One instance busy for 0.2 s: the 7 requests arriving meanwhile go in one run, not seven."""
    model = Recorder(delay=0.2)
    batcher = DynamicBatcher(model, 64, max_queue_delay=0.0, instances=1)
    run(submit_all(batcher, [feeds(1)] * 8, stagger=0.01))
    assert model.calls == [1, 7]


def test_a_cancelled_request_leaves_the_queue():
    model = Recorder()

    async def scenario():
        batcher = DynamicBatcher(model, 8, max_queue_delay=0.3)
        leaving = asyncio.ensure_future(batcher.submit(feeds(1, value=5)))
        staying = asyncio.ensure_future(batcher.submit(feeds(2)))
        await asyncio.sleep(0.05)
        leaving.cancel()
        result = await staying
        await batcher.close()
        return result

    result = run(scenario())
    assert model.calls == [2] and result["y"].shape == (2, 4)


@pytest.mark.parametrize("inputs, mergeable", [
    ({"x": np.zeros((2, 3))}, True),
    ({"x": np.zeros((2, 3)), "m": np.zeros((2,))}, True),
    ({"x": np.zeros((2, 3)), "m": np.zeros((3,))}, False),  # first axes disagree
    ({"x": np.zeros(())}, False),                            # no first axis
])
def test_batch_key(inputs, mergeable):
    assert (batch_key(inputs) is not None) == mergeable


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        DynamicBatcher(Recorder(), 0, 0.1)


def test_the_engine_batches_dynamic_batch_models_and_notes_the_others(onnx_model, tiny_onnx):
    """The classifier (dynamic batch) gets a batcher; a static batch-1 model is served unbatched with a note.
    A request with a wrong shape is refused before it joins a batch, so its neighbours are answered."""
    from adntn_deploy.runtime import load
    from adntn_deploy.runtime.base import InputError
    from adntn_deploy.serving.engine import InferenceEngine, ServeConfig

    engine = InferenceEngine(ServeConfig(str(onnx_model), max_batch_size=8, max_queue_delay_us=100_000))
    model = engine.find("clf")
    assert model.batcher is not None and not engine.notes
    static = InferenceEngine(ServeConfig(str(tiny_onnx("ttn", "linear")), max_batch_size=8))
    assert static.find(next(iter(static.models))).batcher is None
    assert len(static.notes) == 1 and "served unbatched" in static.notes[0]

    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)

    async def scenario():
        good = [engine.run(model, {"input": x[k : k + 1]}, ["logits"]) for k in range(3)]
        bad = engine.run(model, {"input": x[:, :5]})
        results = await asyncio.gather(*good, bad, return_exceptions=True)
        await engine.close()
        return results

    *good, bad = run(scenario())
    assert isinstance(bad, InputError) and "shape (3, 5)" in str(bad)
    expected = load(onnx_model).run({"input": x})["logits"]
    np.testing.assert_allclose(np.concatenate([g["logits"] for g in good]), expected, rtol=1e-5, atol=1e-6)
