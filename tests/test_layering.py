"""Layering guards: ModelOpt's private quantizer/calibrator attributes are touched in one module;
model-family module paths stay in the family files."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT / "sq_plugin" / "modelopt_private.py"
# private TensorQuantizer / _Calibrator attributes of ModelOpt 0.47 (not a calibrator's own `self._x`)
PRIVATE = re.compile(r"(?<!\bself)\._(amax|calibrator|num_bits|unsigned|axis|if_calib|if_quant|disabled|dynamic|"
                     r"narrow_range|get_amax|get_bias|bias_value|bias_type|use_constant_amax|block_sizes|fake_quant|"
                     r"block_reshape_size|setup_for_blockquant|process_for_blockquant)\b")


def _sources():
    for package in ("recipes", "sq_plugin", "calibrators", "benchmarks"):
        yield from sorted((ROOT / package).rglob("*.py"))


def test_private_modelopt_attributes_only_in_the_glue_module():
    offenders = []
    for path in _sources():
        if path == GLUE:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE.search(line.split("#")[0]):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_guard_would_catch_an_access():
    assert PRIVATE.search("cal = q._calibrator") and PRIVATE.search("bits = quantizer._num_bits")
    assert not PRIVATE.search("return self._num_bits") and not PRIVATE.search("q.num_bits")


def test_family_module_paths_stay_in_family_files():
    """HF / torchaudio module names appear only in recipes/speech (the config patterns of the demo's
    HF layout in qconfig are data for users, not structure the code relies on)."""
    paths = re.compile(r"conv_layers|encoder\.layers|encoder\.transformer|_get_feat_extract_output_lengths|"
                       r"\.lm_head\b|\.logits\b(?!\()")
    allowed = {ROOT / "recipes" / name for name in ("search/qconfig.py", "data/train_demo.py", "data/ship_demo.py",
                                                    "export/onnx_runner.py")}
    offenders = []
    for path in sorted((ROOT / "recipes").rglob("*.py")):
        if "speech" in path.parts or path in allowed:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if paths.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_calibrator_bit_sync_is_needed_on_this_modelopt_and_applied():
    """The bit-width workaround is active exactly while ModelOpt does not pass the bits itself."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    import sq_plugin  # noqa: F401
    from calibrators import StableQuantCalibrator
    from sq_plugin.modelopt_private import calibrator_bits, calibrator_of, tuple_calibrators_get_quantizer_bits

    patched = getattr(TensorQuantizer.set_from_attribute_config, "_sq_plugin_sync", False)
    q = TensorQuantizer()
    q.set_from_attribute_config({"num_bits": 6, "calibrator": (StableQuantCalibrator, (), {})})
    assert calibrator_bits(calibrator_of(q))[0] == 6
    assert patched or tuple_calibrators_get_quantizer_bits()


def _import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (function-level imports too), from an AST walk."""
    import ast

    files = {}
    for package in ("calibrators", "sq_plugin", "recipes"):
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != module and not module.startswith(target + "."):
                    found.add(target)  # (a module importing its own package's __init__ is no cycle)
        graph[module] = found
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_between_files():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check works
    assert _cycles(_import_graph()) == []


def test_every_workaround_is_labelled_one_way_with_its_removal_condition():
    """``Workaround:`` then ``Remove when ...`` within a few lines: one spelling to grep for."""
    odd = re.compile(r"WORKAROUND|work[- ]around(?!s? (?:there|in))", re.I)
    offenders, found = [], 0
    for path in [*_sources(), ROOT / "sq.sh"]:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if "Workaround:" in line:
                found += 1
                if not any("Remove when" in later for later in lines[number - 1:number + 6]):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: no 'Remove when' after it")
            elif odd.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: spell it 'Workaround:' ({line.strip()})")
    assert found >= 5 and not offenders, "\n".join(offenders)


def test_recipes_top_level_is_a_few_entry_modules_over_subpackages():
    modules = sorted(p.name for p in (ROOT / "recipes").glob("*.py") if p.name != "__init__.py")
    assert len(modules) <= 6, modules


# the one long function allowed: a declarative argument parser (one add_argument per option)
LONG_ALLOWED = {("recipes/cli.py", "build_parser")}


def test_no_function_over_80_lines():
    """Short functions: a search is a list of phases, a loader a list of steps (the oracle: an AST
    walk counting each function's lines, nested ones included)."""
    import ast

    long = []
    for package in ("recipes", "sq_plugin", "calibrators"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > 80 and (rel, node.name) not in LONG_ALLOWED:
                        long.append(f"{rel}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
