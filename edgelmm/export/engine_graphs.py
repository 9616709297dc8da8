"""The ONNX graphs edgelmm hands to TensorRT, typed for strongly typed networks.

TensorRT 11 builds only strongly typed networks (on 10.x: NetworkDefinitionCreationFlag.STRONGLY_TYPED):
there are no FP16 / INT8 builder flags; every tensor's type comes from the graph. So an engine's
precision is decided here, on any machine, where it can be checked (check_strongly_typed) and run
on ONNX Runtime's CPU provider before a GPU sees it:

  fp16          weights and activations fp16, except where fp16 is not enough (FP32_OPS and the
                values computed from integers):
                  - RMSNorm / LayerNorm statistics (Pow, ReduceMean, Sqrt, Reciprocal,
                    LayerNormalization): the mean of squares of a wide hidden state overflows
                    fp16's 65504 long before the activations themselves do;
                  - Softmax: its exponentials and their sum;
                  - the rotary tables: position x inverse frequency is computed from the integer
                    positions in fp32 (past 2048, fp16 has no integers: long contexts would rotate by
                    the wrong angle), then Sin / Cos; only their results (within [-1, 1]) go fp16;
                  - the attention mask's arithmetic (from the integer mask).
                A value computed from integers or constants is clipped to fp16's range where it
                enters fp16, so a float32-min mask becomes -65504 rather than -inf (a fully masked
                padding row would otherwise turn to NaN and poison the batch through the KV cache).
  int8 vision   the calibrated symmetric (s8) QDQ vision graph, made fp16 the same way: every Q/DQ
                scale becomes fp16, the activation type it scales (a strongly typed network's rule)
  int4 decoder  blocked symmetric INT4 DequantizeLinear (opset 21) feeding fp16 MatMuls

I/O types, on purpose: vision takes fp16 pixels and gives fp16 features; embed gives fp16
embeddings; the decoder takes fp16 embeddings and an fp16 KV cache (half the device memory of an
fp32 cache) and gives fp32 logits (sampling over a large vocabulary wants them unrounded).

Weights stream: each initializer is read (external data: that tensor's bytes only), converted and
written to the output's data file one at a time, so a 3B decoder is never held in memory whole.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportError

FP16_MAX = 65504.0
QDQ_OPSET = 21    # blocked INT4 DequantizeLinear; TensorRT 10's parser reads it
# Ops that run in fp32 in an fp16 graph (see above).
FP32_OPS = frozenset({"Pow", "ReduceMean", "ReduceSumSquare", "Sqrt", "Reciprocal", "Softmax", "LogSoftmax",
                      "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "Sin", "Cos", "CumSum"})
# Compute ops run fp16 unless all their activations are exact fp32 values (the rotary angles' MatMul).
COMPUTE_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"})
# Inputs whose type the op's definition fixes (Resize's roi and scales are float32 whatever X is).
FIXED_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}
# Gathers from a constant table (the token embedding) keep the table in the graph's compute type.
TABLE_OPS = frozenset({"Gather", "GatherElements", "GatherND"})

# Declared I/O types per graph (names as the exporter writes them; '*' matches the layer number).
ENGINE_IO: dict[str, dict[str, str]] = {
    "vision": {"pixel_values": "fp16", "image_features": "fp16"},
    "embed": {"inputs_embeds": "fp16"},
    "decoder": {"inputs_embeds": "fp16", "past_key_values.*": "fp16", "present.*": "fp16", "logits": "fp32"},
}


def _io_type(graph: str, name: str) -> str | None:
    for pattern, kind in ENGINE_IO.get(graph, {}).items():
        if fnmatch.fnmatchcase(name, pattern):
            return kind
    return None


def make_fp16(src: str | Path, dst: str | Path, graph: str) -> dict[str, Any]:
    """Write the fp16 engine graph of `src` (an fp32 graph, plain or QDQ) to `dst`; returns a record
    of what runs in fp32 and the casts added."""
    import onnx

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    _fold_int32_dequantize(model, src.parent)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        # fp16 scales need opset 19+ Q/DQ (13-18 dequantize to float32 only). 19-21 changed the ops
        # used here by adding types (float8, int4) and block sizes, not by changing their meaning.
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx") and opset.version < QDQ_OPSET:
                opset.version = QDQ_OPSET
    typing = _Fp16Pass(model, graph)
    typing.decide()
    typing.rewrite()
    _write_initializers(model, src.parent, dst, typing.fp16_copies)
    return {"graph": graph, "io": dict(ENGINE_IO.get(graph, {})), "fp32_ops": dict(sorted(typing.kept_fp32.items())),
            "casts": len(typing.casts), "clips": sum(1 for t, _ in typing.casts if t in typing.exact)}


class _Fp16Pass:
    """One graph's fp16 typing: `decide` gives every node the type it computes in (fp16, or fp32
    for FP32_OPS and values computed from integers), `rewrite` puts each node's float inputs in its
    type (a Cast, clipped where the value may be out of fp16's range, or an fp16 copy of a weight)
    and the graph outputs in their declared types."""

    def __init__(self, model, graph: str):
        from onnx import TensorProto

        self.model, self.g, self.graph = model, model.graph, graph
        self.FLOAT = TensorProto.FLOAT
        self.elem = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}
        # Graph outputs get a final Cast to their declared type: the producer writes `<name>__compute`.
        self.declared = {o.name: _io_type(graph, o.name) for o in self.g.output}
        self.renamed = {name: f"{name}__compute" for name, kind in self.declared.items() if kind}
        for node in self.g.node:
            node.input[:] = [self.renamed.get(i, i) for i in node.input]
            node.output[:] = [self.renamed.get(o, o) for o in node.output]
        self.types = _tensor_types(model, self.renamed)
        self.initializers = {init.name for init in self.g.initializer}
        self.consts = set(self.initializers) | {n.output[0] for n in self.g.node if n.op_type == "Constant"}
        self.prec: dict[str, str] = {}      # float tensor -> the type it is computed in
        self.exact: set[str] = set()        # fp32 tensors computed from integers or constants
        self.decided: dict[int, str | None] = {}
        self.kept_fp32: dict[str, int] = defaultdict(int)
        self.casts: dict[tuple[str, str], str] = {}
        self.fp16_copies: set[str] = set()
        self.clip_bounds: dict[str, Any] = {}
        self.new_nodes: list = []

    def _is_float(self, name: str) -> bool:
        return bool(name) and self.types.get(name) == self.FLOAT

    # ---- which type each node computes in ----
    def decide(self) -> None:
        for inp in self.g.input:
            if self._is_float(inp.name):
                self.prec[inp.name] = _io_type(self.graph, inp.name) or "fp32"
                inp.type.tensor_type.elem_type = self.elem[self.prec[inp.name]]
        for node in self.g.node:   # a Constant is a constant computed in fp32, cast where it is read
            if node.op_type == "Constant" and self._is_float(node.output[0]):
                self.prec[node.output[0]] = "fp32"
                self.exact.add(node.output[0])
        for index, node in enumerate(self.g.node):
            if node.op_type == "Constant":
                continue
            p, exact, folded = self._decide(node)
            self.decided[index] = p
            if p == "fp32" and not folded:
                self.kept_fp32[node.op_type] += 1
            for o in node.output:
                if self._is_float(o):
                    self.prec[o] = p or "fp32"
                    if exact:
                        self.exact.add(o)

    def _decide(self, node) -> tuple[str | None, bool, bool]:
        """(type the node computes in or None, whether its outputs are exact fp32 values, folded)."""
        op = node.op_type
        float_ins = [i for i in node.input if self._is_float(i)]
        act_ins = [i for i in float_ins if i not in self.consts]
        if node.input and all(i in self.consts or i == "" for i in node.input) and op != "DequantizeLinear":
            self.consts.update(node.output)   # TensorRT folds it; cast (clipped) to what each consumer needs
            return "fp32", True, True
        if op in FP32_OPS:
            return "fp32", False, False
        if op == "DequantizeLinear":
            return "fp16", False, False
        if op == "QuantizeLinear":
            return self.prec.get(node.input[0], "fp16"), False, False
        if op == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            if to != self.FLOAT:
                return None, False, False            # float -> int/bool: takes its input as it is
            if float_ins:
                return self.prec.get(node.input[0], "fp32"), node.input[0] in self.exact, False
            return "fp32", True, False               # integers -> float: positions, masks
        if act_ins:
            if all(self.prec.get(i) == "fp32" for i in act_ins):
                all_exact = all(i in self.exact for i in act_ins)
                p = "fp32" if op not in COMPUTE_OPS or all_exact else "fp16"
                return p, all_exact and p == "fp32", False
            return "fp16", False, False
        if float_ins or any(self._is_float(o) for o in node.output):
            return "fp16", False, False              # a table gather, a Where between constants, ...
        return None, False, False

    # ---- the rewritten graph ----
    def _clip_bound(self, value: float) -> str:
        from onnx import helper

        name = f"edgelmm_fp16_bound_{'max' if value > 0 else 'min'}"
        if name not in self.clip_bounds:
            self.clip_bounds[name] = helper.make_tensor(name, self.FLOAT, [], [value])
        return name

    def _cast_to(self, tensor: str, want: str) -> str:
        from onnx import helper

        key = (tensor, want)
        if key not in self.casts:
            out, source = f"{tensor}__{want}", tensor
            if want == "fp16" and tensor in self.exact:   # may be out of fp16's range (mask minimum)
                source = f"{tensor}__clipped"
                self.new_nodes.append(helper.make_node(
                    "Clip", [tensor, self._clip_bound(-FP16_MAX), self._clip_bound(FP16_MAX)], [source],
                    name=f"{source}_clip"))
            self.new_nodes.append(helper.make_node("Cast", [source], [out], to=self.elem[want], name=f"{out}_cast"))
            self.casts[key] = out
        return self.casts[key]

    def rewrite(self) -> None:
        for index, node in enumerate(self.g.node):
            p = self.decided.get(index)
            if node.op_type != "Constant" and p is not None:
                self._retype(node, p)
            self.new_nodes.append(node)
        self._outputs()
        del self.g.node[:]
        self.g.node.extend(self.new_nodes)
        self.g.initializer.extend(self.clip_bounds.values())
        del self.g.value_info[:]

    def _retype(self, node, p: str) -> None:
        import onnx

        fixed = FIXED_INPUTS.get(node.op_type, set())
        for k, name in enumerate(node.input):
            if not self._is_float(name) or k in fixed:
                continue
            if name in self.initializers:     # a weight: stored in the type that reads it
                if p == "fp16":
                    self.fp16_copies.add(name)
                    node.input[k] = f"{name}__fp16"
            elif self.prec.get(name, "fp32") != p:
                node.input[k] = self._cast_to(name, p)
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == self.FLOAT:
                a.i = self.elem[p]
            elif (node.op_type == "ConstantOfShape" and p == "fp16" and a.name == "value"
                  and a.t.data_type == self.FLOAT):
                value = np.clip(onnx.numpy_helper.to_array(a.t), -FP16_MAX, FP16_MAX).astype(np.float16)
                a.t.CopyFrom(onnx.numpy_helper.from_array(value, a.t.name))

    def _outputs(self) -> None:
        """Graph outputs: from the type they were computed in to the declared one."""
        from onnx import helper

        for o in self.g.output:
            if o.name in self.renamed:
                inner, want = self.renamed[o.name], self.declared[o.name]
                if self.prec.get(inner, "fp32") == want:
                    self.new_nodes.append(helper.make_node("Identity", [inner], [o.name], name=f"{o.name}_out"))
                elif want == "fp16" and inner in self.exact:
                    self.new_nodes.append(helper.make_node("Identity", [self._cast_to(inner, "fp16")], [o.name],
                                                           name=f"{o.name}_out"))
                else:
                    self.new_nodes.append(helper.make_node("Cast", [inner], [o.name], to=self.elem[want],
                                                           name=f"{o.name}_out"))
                o.type.tensor_type.elem_type = self.elem[want]
            elif self._is_float(o.name):
                o.type.tensor_type.elem_type = self.elem[self.prec.get(o.name, "fp32")]


def _fold_int32_dequantize(model, src_dir: Path) -> int:
    """Replace each DequantizeLinear of a constant INT32 tensor (ONNX Runtime's quantized biases)
    by the float constant it computes: TensorRT dequantizes INT8 and INT4 only. Returns how many."""
    import onnx
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    folded, keep = 0, []
    for n in g.node:
        x = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if x is None or x.data_type != onnx.TensorProto.INT32 or any(i and i not in inits for i in n.input):
            keep.append(n)
            continue
        arrays = [numpy_helper.to_array(inits[i], str(src_dir)) if i else None for i in n.input]
        values, scale = arrays[0].astype(np.float64), arrays[1].astype(np.float64)
        zero = arrays[2].astype(np.float64) if len(arrays) > 2 and arrays[2] is not None else 0.0
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if np.ndim(scale) == 1 and values.ndim > 1:   # per-axis: scale along `axis`
            shape = [1] * values.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), np.reshape(zero, shape) if np.ndim(zero) else zero
        real = ((values - zero) * scale).astype(numpy_helper.to_array(inits[n.input[1]]).dtype)
        g.initializer.append(numpy_helper.from_array(real, n.output[0]))
        folded += 1
    if folded:
        del g.node[:]
        g.node.extend(keep)
    return folded


def _tensor_types(model, renamed: dict[str, str]) -> dict[str, int]:
    """Every tensor's element type, by ONNX shape inference over the (renamed) graph."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for o in probe.graph.output:
        o.name = renamed.get(o.name, o.name)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=True)
    except Exception as exc:   # onnx raises its own InferenceError types
        raise ExportError(f"ONNX type inference failed on the graph for TensorRT: {exc}") from None
    types = {t.name: t.data_type for t in inferred.graph.initializer}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    for n in inferred.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def _write_initializers(model, src_dir: Path, dst: Path, fp16_copies: set[str]) -> None:
    """Save `model` to `dst`, float32 initializers named in `fp16_copies` also as fp16 copies
    (`<name>__fp16`, clipped to fp16's range). Initializers kept in external data stream, one at a
    time, into `<dst>.data`; small graphs stay in one file."""
    import onnx
    from onnx import numpy_helper

    g = model.graph
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in g.initializer)
    used = {i for n in g.node for i in n.input}
    data_name = dst.name + ".data"
    out_inits = []
    data = open(dst.parent / data_name, "wb") if external else None
    try:
        def emit(array: np.ndarray, name: str) -> None:
            tensor = numpy_helper.from_array(np.asarray(array, order="C"), name)   # ascontiguousarray makes 0-d 1-d
            if data is not None and tensor.ByteSize() > 1024:
                offset = data.tell()
                raw = tensor.raw_data
                data.write(raw)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
            out_inits.append(tensor)

        for init in g.initializer:
            array = numpy_helper.to_array(init, str(src_dir)) if init.data_location == onnx.TensorProto.EXTERNAL \
                else numpy_helper.to_array(init)
            if init.name in used:
                emit(array, init.name)
            if init.name in fp16_copies:
                emit(np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16), f"{init.name}__fp16")
            del array
    finally:
        if data is not None:
            data.close()
    del g.initializer[:]
    g.initializer.extend(out_inits)
    onnx.save_model(model, str(dst))


# ---------------------------------------------------------------- what TensorRT is handed

# Engine precision -> per graph, the variant of the graph it is built from.
ENGINE_VARIANTS: dict[str, dict[str, str]] = {
    "fp32": {"vision": "fp32", "embed": "fp32", "decoder": "fp32"},
    "fp16": {"vision": "fp16", "embed": "fp16", "decoder": "fp16"},
    "int8-vision": {"vision": "int8", "embed": "fp16", "decoder": "fp16"},
    "int4": {"vision": "fp16", "embed": "fp16", "decoder": "int4"},
    "int8-vision+int4": {"vision": "int8", "embed": "fp16", "decoder": "int4"},
}
# What the engine's compute layers should run in, per variant (the layer report's "wanted").
VARIANT_COMPUTE = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int4": "fp16"}


def make_engine_graph(variant: str, graph: str, fp32_src: Path, dst: Path, *, int8_src: Path | None = None,
                      int4_block_size: int = 32) -> dict[str, Any]:
    """The graph an engine of `variant` is built from, written at `dst` (checked strongly typed):
    fp32 (the bundle's graph as it is: `dst` is not written, the record says so), fp16, int8 (the
    calibrated s8 QDQ vision graph, fp16 elsewhere) or int4 (blocked INT4 weights, fp16 elsewhere)."""
    record: dict[str, Any] = {"variant": variant}
    if variant == "fp32":
        source = fp32_src
    elif variant == "fp16":
        record.update(make_fp16(fp32_src, dst, graph))
        source = dst
    elif variant == "int8":
        if int8_src is None:
            raise ExportError("an INT8 vision engine is built from the calibrated s8 QDQ vision graph, and there is none")
        record.update(make_fp16(int8_src, dst, graph))
        source = dst
    elif variant == "int4":
        from ..calib.quantize import quantize_decoder_int4_qdq

        qdq = dst.with_name(dst.name.replace(".onnx", ".fp32-qdq.onnx"))
        record["int4"] = quantize_decoder_int4_qdq(fp32_src, qdq, block_size=int4_block_size)
        record.update(make_fp16(qdq, dst, graph))
        for path in [qdq, *qdq.parent.glob(qdq.name + "*")]:
            path.unlink(missing_ok=True)
        source = dst
    else:
        raise ExportError(f"unknown engine graph variant {variant!r}")
    problems = check_strongly_typed(source)
    if problems:
        raise ExportError(f"{source.name}: not a graph a strongly typed TensorRT network can take: "
                          + "; ".join(problems[:5]))
    record["file"] = source
    return record


def check_strongly_typed(path: str | Path) -> list[str]:
    """What keeps the graph at `path` from building as a strongly typed TensorRT network: a tensor
    whose type inference leaves undefined, float64, a Q/DQ that is not symmetric INT8 or blocked
    INT4, or a Q/DQ scale whose type is not the float type it converts from / to. Empty when fine."""
    import onnx
    from onnx import TensorProto, numpy_helper

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:
        return [f"type inference fails: {exc}"]
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    for n in g.node:
        if n.op_type == "Constant":
            types[n.output[0]] = next(a.t.data_type for a in n.attribute if a.name == "value")
    inits = {t.name: t for t in g.initializer}
    problems = []
    for n in g.node:
        for o in n.output:
            if o and types.get(o, TensorProto.UNDEFINED) == TensorProto.UNDEFINED:
                problems.append(f"{n.op_type} {n.name}: output {o} has no type")
            elif types.get(o) == TensorProto.DOUBLE:
                problems.append(f"{n.op_type} {n.name}: output {o} is float64")
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        quantized = n.output[0] if n.op_type == "QuantizeLinear" else n.input[0]
        real = n.input[0] if n.op_type == "QuantizeLinear" else n.output[0]
        qtype, scale_type = types.get(quantized), types.get(n.input[1])
        attrs = {a.name: a for a in n.attribute}
        if qtype == TensorProto.INT4:
            if n.op_type != "DequantizeLinear" or n.input[0] not in inits or not attrs.get("block_size") \
                    or attrs["block_size"].i <= 0:
                problems.append(f"{n.op_type} {n.name}: INT4 must be blocked weights (a constant through "
                                "DequantizeLinear with block_size)")
        elif qtype != TensorProto.INT8:
            problems.append(f"{n.op_type} {n.name}: quantized type {TensorProto.DataType.Name(qtype or 0)} "
                            "(TensorRT takes symmetric INT8 or blocked INT4)")
        if scale_type != types.get(real) or scale_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            problems.append(f"{n.op_type} {n.name}: scale type {TensorProto.DataType.Name(scale_type or 0)} is not "
                            f"the float type it scales ({TensorProto.DataType.Name(types.get(real) or 0)})")
        if len(n.input) > 2 and n.input[2] and types.get(n.input[2]) != qtype:
            problems.append(f"{n.op_type} {n.name}: zero point type {TensorProto.DataType.Name(types.get(n.input[2]) or 0)} "
                            f"is not the quantized type {TensorProto.DataType.Name(qtype or 0)}")
        if len(n.input) > 2 and n.input[2]:
            zp = inits.get(n.input[2])
            values = numpy_helper.to_array(zp, str(path.parent)) if zp is not None else None
            if values is None or np.any(values != 0):
                problems.append(f"{n.op_type} {n.name}: a non-zero (or computed) zero point; TensorRT's "
                                "quantization is symmetric")
    return problems


_DTYPE_NAMES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 9: "bool", 3: "int8", 2: "uint8"}


def graph_io(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of an ONNX graph as the manifest lists them: name, dtype, shape."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph

    def desc(v):
        t = v.type.tensor_type
        return {"name": v.name, "dtype": _DTYPE_NAMES.get(t.elem_type, str(t.elem_type)),
                "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}
    return [desc(v) for v in g.input], [desc(v) for v in g.output]
