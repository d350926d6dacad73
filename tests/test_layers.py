"""The layer contract: imports flow one way through the pipeline, and no module imports itself back.

Every import counts, the ones inside functions too (they are how heavy packages stay lazy, not a way
around the layering). Layers, lowest first; a module may import its own layer and the ones below it:
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "adntn_deploy"

#: the pipeline's stages, lowest first (docs/architecture.md draws them)
LAYERS = [
    ["adntn_deploy.version", "adntn_deploy.errors", "adntn_deploy.safejson", "adntn_deploy.limits", "adntn_deploy.outputs",
     "adntn_deploy.reporting"],
    ["adntn_deploy.ir"],
    ["adntn_deploy.generators"],
    ["adntn_deploy.nn", "adntn_deploy.fit"],
    ["adntn_deploy.models", "adntn_deploy.data", "adntn_deploy.checkpoint", "adntn_deploy.training",
     "adntn_deploy.compression", "adntn_deploy.presets", "adntn_deploy.workflows", "adntn_deploy.distributed"],
    ["adntn_deploy.onnx_export"],
    ["adntn_deploy.compiler"],
    ["adntn_deploy.runtime"],
    ["adntn_deploy.serving", "adntn_deploy.inspection", "adntn_deploy.demo"],
    ["adntn_deploy.cli"],
    ["adntn_deploy"],  # the facade: adntn_deploy.load / compress / export_onnx / finetune
]

#: the compiler stage's own layers, lowest first: data flows target -> frontend -> schedules -> end points
COMPILER_LAYERS = [
    ["adntn_deploy.compiler.errors", "adntn_deploy.compiler.profiles", "adntn_deploy.compiler.native_log"],
    ["adntn_deploy.compiler.target", "adntn_deploy.compiler.artifact", "adntn_deploy.compiler.graph_rewrites"],
    ["adntn_deploy.compiler.schedules.common"],
    ["adntn_deploy.compiler.schedules.pointwise_conv2d"],  # a kernel packed_conv2d's rewrite hands 1x1 convs
    ["adntn_deploy.compiler.schedules.packed_dense", "adntn_deploy.compiler.schedules.packed_conv2d",
     "adntn_deploy.compiler.schedules.streamed_dense"],
    ["adntn_deploy.compiler.schedules"],
    ["adntn_deploy.compiler.frontend", "adntn_deploy.compiler.database"],
    ["adntn_deploy.compiler.tuning", "adntn_deploy.compiler.build", "adntn_deploy.compiler.runner",
     "adntn_deploy.compiler.refresh"],
    ["adntn_deploy.compiler.bundle"],
]

#: modules that may import tvm (lazily): the compiler stage and the TVM runtime predictor
TVM_IMPORTERS = ("adntn_deploy.compiler", "adntn_deploy.runtime.tvm")
#: the torch layers import nothing from the deployment side
DEPLOYMENT = ("adntn_deploy.onnx_export", "adntn_deploy.compiler", "adntn_deploy.runtime", "adntn_deploy.serving",
              "adntn_deploy.cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """The modules (ours and others) that ``name`` imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # "from pkg import module" imports the module
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return found


GRAPH = {name: {m for m in _imports(name, path) if m in MODULES and m != name} for name, path in MODULES.items()}


def _rank(module: str, layers: list[list[str]]) -> int | None:
    """Index of the most specific layer entry that ``module`` is or lies under."""
    best, best_len = None, -1
    for index, group in enumerate(layers):
        for prefix in group:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def _is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _rank(m, LAYERS) is None] == []
    compiler = [m for m in MODULES if _is_under(m, "adntn_deploy.compiler") and m != "adntn_deploy.compiler"]
    assert [m for m in compiler if _rank(m, COMPILER_LAYERS) is None] == []


@pytest.mark.parametrize("layers", [LAYERS, COMPILER_LAYERS], ids=["stages", "compiler"])
def test_no_upward_import(layers):
    upward = []
    for module, imported in GRAPH.items():
        own = _rank(module, layers)
        for target in imported:
            theirs = _rank(target, layers)
            if own is not None and theirs is not None and theirs > own and not _is_under(module, target):
                upward.append(f"{module} -> {target}")
    assert upward == [], "upward imports (move the code down, or the caller up): " + ", ".join(sorted(upward))


def test_no_import_cycle():
    """No module reaches itself through imports (Tarjan's strongly connected components)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in GRAPH[node]:
            if _is_under(node, nxt):  # a module importing its own package's __init__ is how packages work
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert cycles == [], f"import cycles: {cycles}"


def test_only_the_compiler_and_the_tvm_runtime_import_tvm():
    importers = sorted(m for m, p in MODULES.items()
                       if any(i == "tvm" or i.startswith("tvm.") or i == "tvm_ffi" for i in _imports(m, p)))
    assert importers and all(any(_is_under(m, allowed) for allowed in TVM_IMPORTERS) for m in importers), importers


def test_nothing_outside_the_cli_imports_it():
    """The library never reaches up into click commands: cli/ parses, calls one library function, formats."""
    leaks = [f"{m} -> {t}" for m, imported in GRAPH.items() if not _is_under(m, "adntn_deploy.cli")
             for t in imported if _is_under(t, "adntn_deploy.cli")]
    assert leaks == []


def test_torch_layers_import_nothing_from_the_deployment_side():
    below = [m for m in MODULES if (_rank(m, LAYERS) or 0) <= _rank("adntn_deploy.nn", LAYERS)]
    leaks = [f"{m} -> {t}" for m in below for t in GRAPH[m] if any(_is_under(t, d) for d in DEPLOYMENT)]
    assert leaks == []


def test_the_command_line_and_the_server_start_without_torch():
    """torch costs about 3 s and 180 MiB at import: ``--version``, ``serve`` and the KServe memory request
    (measured on a process that imports what serve imports) must not pay for it. A fresh interpreter, since
    this one has torch loaded already."""
    import subprocess
    import sys

    probe = ("import sys; import adntn_deploy.cli.main, adntn_deploy.serving.app, adntn_deploy.serving.grpc_service, "
             "adntn_deploy.runtime.ort; print(sorted(m for m in ('torch', 'tvm') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
