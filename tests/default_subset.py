"""Which cases of the big parametrized end-to-end grids run in the default suite; the rest run with the slow tests.

A plain ``python -m pytest`` must stay within ~12 minutes on 2 cores and still cover every feature once.
Each grid below multiplies families x layer kinds x layouts x weight modes (x activations); the kept ids
cover every value of every axis at least once (checked by :func:`uncovered`, which a test runs), so a
feature broken for one family or mode still fails the default suite. The whole grids run under
``python -m pytest -m slow`` and in the README's test command (``-m "slow or not slow"``), which CI runs.

Ids are pytest's parameter ids, ``[a-b-c]`` in the order pytest prints them.
"""

from __future__ import annotations

#: test node (file::function) -> the parameter ids that stay in the default suite
DEFAULT_CASES: dict[str, set[str]] = {
    # weights-layout-kind-family
    "tests/test_compiler.py::test_tvm_matches_onnxruntime_and_torch": {
        "load-split-linear-ttn", "fold-split-conv-attn", "load-operator-conv-mera",
    },
    # kind-family-layout
    "tests/test_onnx_export.py::test_torch_equals_onnxruntime": {
        "linear-ttn-split", "conv-attn-operator", "attention-mera-split",
    },
    # family-top activation-kind (every activation's TIR lowering is checked alone in tests/test_activations.py)
    "tests/test_streaming.py::test_stream_matches_load_mode_and_torch": {
        "ttn-identity-linear", "attn-relu-linear", "mera-identity-conv",
    },
    # weights-layout
    "tests/test_edge_runner.py::test_adntn_model_compiled_for_rpi4_runs_under_qemu_like_on_x86": set(),
    # mode-kind
    "tests/test_streaming.py::test_operator_layout_streams_as_kronecker_products_in_tvm": {"stream-conv", "auto-linear"},
    # profile
    "tests/test_compiler.py::test_gpu_profiles_compile_and_export": {"cuda-sm80", "jetson-orin", "opencl-adreno"},
    "tests/test_compiler.py::test_cross_compile_links_for_the_board": {"aarch64", "armv7-neon-hf", "riscv64",
                                                                      "riscv64-rvv"},
    # family
    "tests/test_nn.py::test_a_4096_square_layer_trains_towards_a_target_weight": set(),
    # weights-batch
    "tests/test_dense.py::test_packed_equals_ort_and_generic": {"load-1", "fold-3", "load-16"},
    # model-layer-family-[operator-]ratio
    "tests/test_presets.py::test_preset_weight_is_the_same_in_numpy_and_torch": {
        "alexnet-fc6-ttn-2k", "vgg16-fc7-attn-50k", "vgg16-fc8-mera-35k", "vgg16-fc8-attn-10k",
        "vgg16-fc7-mera-operator-77k", "vgg16-fc7-ttn-operator-2k", "vgg16-fc7-attn-operator-50k",
    },
    # family-options
    "tests/test_generators.py::test_gradients_match_finite_differences": {"ttn-options0", "attn-options5", "mera-options8"},
    # layout
    "tests/test_compression.py::test_compress_layouts": {"auto"},
    # which layers fine-tune
    "tests/test_compression.py::test_finetune_recovers_accuracy": {"head"},
    # runtime-options-storage
    "tests/test_kserve.py::test_package_writes_a_valid_inferenceservice": {"adntn-extra0-pvc://adntn-models/small"},
}

#: grid -> {axis position: why the default subset need not cover every value of that axis}
EXEMPT_AXES: dict[str, dict[int, str]] = {
    "tests/test_streaming.py::test_stream_matches_load_mode_and_torch": {
        1: "each activation's TIR lowering is checked against numpy in tests/test_activations.py"},
    "tests/test_nn.py::test_a_4096_square_layer_trains_towards_a_target_weight": {
        0: "a scale test (4096^2, 13 s each): every family trains at small sizes in tests/test_nn.py"},
    "tests/test_edge_runner.py::test_adntn_model_compiled_for_rpi4_runs_under_qemu_like_on_x86": {
        0: "a 15-20 s qemu run per case; tests/test_edge_runner.py::test_runner_aarch64_qemu runs an aarch64 "
           "artifact with the native runner under qemu, the test_compiler grid covers every weights mode on x86",
        1: "the layouts' kernels are built for aarch64 by tests/test_streaming.py::"
           "test_operator_stream_compiles_for_gpu_and_arm and test_compiler's cross-compile cases"},
    "tests/test_compiler.py::test_gpu_profiles_compile_and_export": {
        0: "cuda-sm90 builds the same CUDA code as cuda-sm80 for another arch",
        1: "(the arch part of cuda-sm90's id)"},
    "tests/test_compiler.py::test_cross_compile_links_for_the_board": {
        0: "rpi4 and rpi5 are aarch64 profiles (another -mcpu), linked like the aarch64 case; the demo test "
           "(tests/test_cli.py) cross-compiles for rpi4 too"},
    "tests/test_kserve.py::test_package_writes_a_valid_inferenceservice": {
        0: "the triton runtime's manifest is validated against the schema by test_every_runtime_and_storage_validate",
        1: "the options only change the manifest's text, checked there too",
        2: "every storage scheme is validated by test_every_runtime_and_storage_validate"},
    "tests/test_generators.py::test_gradients_match_finite_differences": {
        1: "each family's option sets are its own (sharing, gates, activations); every family keeps one"},
    "tests/test_compression.py::test_compress_layouts": {0: "auto fits both the operator and the split layout"},
    "tests/test_compression.py::test_finetune_recovers_accuracy": {
        0: "fine-tuning all layers runs the same loop as the head; tests/test_workflows.py fine-tunes a whole model"},
}


#: every id collected for each grid in this session (filled at collection, before ``-m`` deselects)
COLLECTED: dict[str, list[str]] = {}


def is_default(nodeid: str) -> bool:
    """Whether the collected test ``nodeid`` ("tests/x.py::test_f[a-b]") stays in the default suite.

    Tests outside :data:`DEFAULT_CASES` always do (their own ``slow`` marks aside)."""
    name, _, rest = nodeid.partition("[")
    kept = DEFAULT_CASES.get(name)
    if kept is None:
        return True
    COLLECTED.setdefault(name, []).append(rest.rstrip("]"))
    return rest.rstrip("]") in kept


def uncovered(nodeid_prefix: str, all_ids: list[str]) -> list[str]:
    """The axis values of grid ``nodeid_prefix`` (its ``all_ids``, split at "-") that no default id covers.

    An axis value is covered when some kept id has it at the same position; :data:`EXEMPT_AXES` lists the
    axes a grid need not cover, and why.
    """
    kept = [case.split("-") for case in DEFAULT_CASES[nodeid_prefix]]
    exempt = EXEMPT_AXES.get(nodeid_prefix, {})
    missing = []
    for case in all_ids:
        for position, value in enumerate(case.split("-")):
            if position not in exempt and not any(len(k) > position and k[position] == value for k in kept):
                missing.append(f"{value} (position {position})")
    return sorted(set(missing))
