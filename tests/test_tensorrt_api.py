"""A guard on edgelmm's TensorRT code, read as a syntax tree (TensorRT cannot be installed here):
it uses only the Python API that TensorRT 10.3 (JetPack 6.1/6.2) and 11.x (desktop) share. It fails
on anything TensorRT 11 removed (weak typing: precision builder flags, the INT8 calibrator, the
platform queries, layer precisions) and on any `trt.` name not in the table of names checked to
exist in both (NVIDIA's binding sources at v10.3.0 and v11.1, the 11.4 wheel; "Migrating from
TensorRT 10.x to 11.x"). It guards the API surface only; engines are built and run on a GPU."""

import ast
from pathlib import Path

import edgelmm

ROOT = Path(edgelmm.__file__).parent
# Modules that talk to TensorRT.
TRT_MODULES = ["export/tensorrt.py", "runtimes/tensorrt.py", "runtimes/select.py"]

# `trt.` names present with the same meaning in 10.3 and 11.x. A new one goes here after checking both.
BOTH_VERSIONS = {
    "trt.__version__", "trt.Builder", "trt.Runtime", "trt.OnnxParser", "trt.ILogger", "trt.ILogger.__init__",
    "trt.ILogger.Severity.ERROR", "trt.ILogger.Severity.INTERNAL_ERROR", "trt.nptype", "trt.float32",
    "trt.TensorIOMode.INPUT", "trt.ProfilingVerbosity.DETAILED", "trt.MemoryPoolType.WORKSPACE",
    "trt.LayerInformationFormat.JSON", "trt.ElementWiseOperation.SUM",
    # kept in 11 (deprecated, ignored: every network is strongly typed); its bit moved, so it is read
    # from the enum, never written as a number
    "trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED",
}
# Removed in TensorRT 11 (NVIDIA's "Removed Python APIs and Replacements"), or absent from 10.3.
REMOVED = {
    # weak typing
    "FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS",
    "STRICT_TYPES", "EXPLICIT_BATCH", "DIRECT_IO",
    # the INT8 calibrator and quantization flags
    "int8_calibrator", "set_calibration_profile", "get_calibration_profile", "quantization_flags",
    "set_quantization_flag", "get_quantization_flag", "clear_quantization_flag", "IInt8Calibrator",
    "IInt8EntropyCalibrator", "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator", "IInt8LegacyCalibrator",
    # platform queries
    "platform_has_fast_fp16", "platform_has_fast_int8", "platform_has_tf32",
    # per-layer precision
    "set_output_type", "reset_precision", "precision_is_set", "output_type_is_set", "reset_output_type",
    # v1 memory queries, the algorithm selector
    "get_device_memory_size_for_profile", "create_execution_context_without_device_memory", "algorithm_selector",
    "IAlgorithmSelector",
    # 11.x-only (absent from 10.3)
    "block_shape", "add_dynamic_quantize",
}
# Names that are removed on a TensorRT object but are also ordinary Python attributes elsewhere
# (self.precision in edgelmm's own classes): flagged only on a layer.
LAYER_ONLY = {"precision"}


def _dotted(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id] + parts[::-1])
    return None


def api_problems(source: str, filename: str = "<code>") -> list[str]:
    """Every TensorRT 11 / 10.3 incompatibility this checker can see in `source`."""
    tree = ast.parse(source, filename)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            where = f"{filename}:{node.lineno}"
            if node.attr in REMOVED:
                problems.append(f"{where}: .{node.attr} (removed in TensorRT 11 or absent from 10.3)")
            elif node.attr in LAYER_ONLY and dotted and "layer" in dotted.split(".")[-2].lower():
                problems.append(f"{where}: {dotted} (layer precision: removed in TensorRT 11)")
            if dotted and dotted.startswith("trt.") and not any(
                    dotted == name or name.startswith(dotted + ".") for name in BOTH_VERSIONS):
                problems.append(f"{where}: {dotted} is not in the table of names checked in 10.3 and 11")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "create_network":
            if not node.args or isinstance(node.args[0], ast.Constant):
                problems.append(f"{filename}:{node.lineno}: create_network with a literal flag (the STRONGLY_TYPED "
                                "bit is 1 on 10.x and 0 on 11.x: read it from the enum)")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "set_flag":
            problems.append(f"{filename}:{node.lineno}: a builder flag (precision comes from the graph's types)")
    return problems


def test_edgelmm_tensorrt_code_uses_only_what_10_3_and_11_share():
    problems = []
    for rel in TRT_MODULES:
        path = ROOT / rel
        problems += api_problems(path.read_text(), rel)
    assert problems == []
    # and the modules that talk to TensorRT are all listed
    users = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if "trt." in p.read_text())
    assert set(users) <= set(TRT_MODULES), users


def test_the_checker_catches_the_weakly_typed_api():
    old = '''
import tensorrt as trt
builder = trt.Builder(logger)
network = builder.create_network(0)
config = builder.create_builder_config()
if builder.platform_has_fast_fp16:
    config.set_flag(trt.BuilderFlag.FP16)
config.set_flag(trt.BuilderFlag.INT8)
config.int8_calibrator = calibrator
layer.precision = trt.float16
network.get_layer(0).set_output_type(0, trt.float16)
q = network.add_quantize(x, scale)
q.block_shape = (1, 32)
'''
    problems = api_problems(old)
    for words in ("create_network with a literal flag", "platform_has_fast_fp16", ".FP16", ".INT8", "int8_calibrator",
                  "layer.precision", "set_output_type", "trt.BuilderFlag.FP16 is not in the table", "a builder flag",
                  "block_shape", "trt.float16 is not in the table"):
        assert any(words in p for p in problems), (words, problems)
    assert api_problems("self.precision = 'fp16'\nnetwork = builder.create_network(1 << int("
                        "trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))\n") == []
