"""Three ONNX graphs per model with torch.onnx.export(dynamo=True), the only mode that exports
every family (the TorchScript exporter has no Unfold for the Idefics vision towers):

  vision:  pixel_values [tiles,3,H,W] (+ pixel_attention_mask [tiles,H,W]) -> image_features [tiles,T,D]
  embed:   input_ids [batch,seq] -> inputs_embeds [batch,seq,D]
  decoder: inputs_embeds, attention_mask [batch,past+seq], position_ids [batch,seq],
           past_key_values.{i}.key/value [batch,kv_heads,past,head_dim]
           -> logits [batch,vocab] (last position only), present.{i}.key/value
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from ..bundle import graph_file
from ..errors import ExportError
from ..families import Family, TorchParts
from .fused_decoder import GRAPH as FUSED_GRAPH
from .fused_decoder import build_fused_decoder, fused_support

ONNX_OPSET = 18
_DTYPES = {1: "float32", 7: "int64", 10: "float16", 9: "bool", 6: "int32"}


def text_dims(config: dict[str, Any]) -> dict[str, int]:
    tc = config.get("text_config") or config
    heads = tc["num_attention_heads"]
    return {
        "num_layers": tc["num_hidden_layers"],
        "num_kv_heads": tc.get("num_key_value_heads") or heads,
        "head_dim": tc.get("head_dim") or tc["hidden_size"] // heads,
        "hidden_size": tc["hidden_size"],
        "vocab_size": tc["vocab_size"],
    }


def past_names(num_layers: int, prefix: str = "past_key_values") -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def _wrappers(parts: TorchParts, num_layers: int):
    import torch
    from transformers import DynamicCache

    from ..runtimes.torch import cache_argument, returned_cache

    class Vision(torch.nn.Module):
        def forward(self, pixel_values, pixel_attention_mask=None):
            return parts.vision(pixel_values, pixel_attention_mask)

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = parts.embed_tokens

        def forward(self, input_ids):
            return self.embed(input_ids)

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder, self.lm_head = parts.decoder, parts.lm_head

        def forward(self, inputs_embeds, attention_mask, position_ids, past):
            cache = DynamicCache()
            for i in range(num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=True, **cache_argument(self.decoder, cache))
            # lm_head on the last position only: over every position it dominates prefill.
            logits = self.lm_head(out.last_hidden_state[:, -1, :])
            present = []
            for layer in returned_cache(out).layers[:num_layers]:
                present += [layer.keys, layer.values]
            return (logits, *present)

    return Vision(), Embed(), Decoder()


def _io(model) -> tuple[list[dict], list[dict]]:
    from onnxscript import ir

    def desc(value):
        v = ir.serde.serialize_value(value)
        t = v.type.tensor_type
        return {"name": v.name, "dtype": _DTYPES.get(t.elem_type, str(t.elem_type)),
                "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}
    return [desc(v) for v in model.graph.inputs], [desc(v) for v in model.graph.outputs]


# A graph whose weights exceed this keeps them in <graph>.onnx.data beside it, written tensor by tensor
# straight from the PyTorch weights; an embedded graph costs about 3x its weights while it is
# serialized (and protobuf cannot hold 2 GB at all). ONNX Runtime maps external data and reads
# pages as they are used instead of parsing the weights out of the protobuf. Below this a graph
# stays one self-contained file, its save costing at most ~200 MB.
EXTERNAL_DATA_BYTES = 64 << 20


def _export_one(module, args, path: Path, input_names, output_names, dynamic_shapes) -> tuple[list[dict], list[dict]]:
    """Export, optimize and save one graph at `path`; return its inputs and outputs (_io)."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # optimize=False: _optimize runs the exporter's optimizer without its one quadratic rule.
            model = torch.onnx.export(module.eval(), args, None, dynamo=True, input_names=input_names,
                                      output_names=output_names, dynamic_shapes=dynamic_shapes,
                                      opset_version=ONNX_OPSET, optimize=False, verbose=False).model
        _optimize(model)
        fold_reciprocal_sqrt(model)
        _save(model, path)
        return _io(model)
    except Exception as exc:  # the exporter raises many types; the user needs to know which graph failed
        raise ExportError(f"torch.onnx.export failed on the {path.stem} graph: {type(exc).__name__}: {exc}") from exc


def _optimize(model) -> None:
    """What torch.onnx.export(optimize=True) runs (onnxscript's optimize_ir; its opset-23 fusions
    do not apply at opset 18) less the SlicesSplit rewrite rule. That rule's two-output pattern is
    matched by walking the whole graph for every Slice node, O(nodes x Slices): on a 30-layer
    decoder (6000 nodes, 210 Slices) it took 24 of the optimizer's 28 s and grows with the layers
    squared, and it never applies to these graphs (it wants the end of x[..., d // 2:] to be d;
    the exporter writes INT64_MAX), so the graphs come out the same. The weights' Transposes
    still fold, into numpy views of the PyTorch weights that the save writes out in chunks."""
    import onnxscript.optimizer._constant_folding as folding
    from onnxscript import ir, rewriter
    from onnxscript.rewriter.rules.common import slice_split_rule

    # optimize_ir's passes as of onnxscript 0.7, which has no way to drop one rule from them
    # (tests/test_export_scale.py checks that the two agree).
    common = ir.passes.common
    rules = [r for r in rewriter._DEFAULT_REWRITE_RULES if r is not slice_split_rule]
    ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager([
            folding.FoldConstantsPass(shape_inference=True,
                                      input_size_limit=folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                      output_size_limit=folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                                      should_fold=lambda node: None),
            rewriter.RewritePass(rules),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
        ], steps=2, early_stop=True),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)
    # The rules are module-level objects whose matchers keep the last graph they looked at, and with
    # it every initializer: the PyTorch weights would outlive the model (a Mantis-1B export held its
    # 4.9 GB decoder through verify). Forget it.
    for rule in rules:
        matcher = getattr(rule, "_matcher", None)
        for name in ("_graph", "_tracer", "_match", "_current_node"):
            if hasattr(matcher, name):
                setattr(matcher, name, None)


def fold_reciprocal_sqrt(model) -> int:
    """Rewrite x * Reciprocal(Sqrt(v)) as x / Sqrt(v) in `model` (an onnx_ir Model); return how many.

    The exporter writes RMSNorm's rsqrt as Sqrt -> Reciprocal -> Mul, a pattern ONNX Runtime's
    SimplifiedLayerNormFusion does not match; as Sqrt -> Div it fuses every RMSNorm into one
    SimplifiedLayerNormalization kernel at session load (reference decoder: 326 -> 272 nodes,
    0.416 -> 0.379 ms per decode step on 1 thread). Still plain ONNX, so TensorRT parses it as before."""
    graph = model.graph
    folded = []
    for rec in graph:
        if rec.op_type != "Reciprocal" or rec.domain != "":
            continue
        sqrt, out = rec.inputs[0].producer(), rec.outputs[0]
        uses = list(out.uses())
        if sqrt is None or sqrt.op_type != "Sqrt" or not uses or out.is_graph_output() \
                or any(u.node.op_type != "Mul" or list(u.node.inputs).count(out) != 1 for u in uses):
            continue
        for mul, index in uses:
            other = mul.inputs[1 - index]
            mul.op_type = "Div"
            mul.replace_input_with(0, other)
            mul.replace_input_with(1, sqrt.outputs[0])
        folded.append(rec)
    graph.remove(folded, safe=True)
    return len(folded)


def _save(model, path: Path) -> None:
    from onnxscript import ir

    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if weights > EXTERNAL_DATA_BYTES:
        ir.save(model, path, external_data=f"{path.name}.data")
    else:
        ir.save(model, path)


PRECISIONS = ("fp32", "fp16")


def export_onnx_graphs(family: Family, model, out_dir: Path, sample_vision, precision: str = "fp32") -> list[dict[str, Any]]:
    """Write the vision, embed and decoder graphs of `model` (already in the precision's dtype: fp16
    graphs are exported from a half-precision model, so every op and the KV cache are fp16) under
    out_dir/onnx/; return their artifact entries; "files" lists the graph file first, then any
    external-data files (relative to out_dir)."""
    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    parts = family.torch_parts(model)
    dims = text_dims(family.config)
    L = dims["num_layers"]
    vision, embed, decoder = _wrappers(parts, L)
    onnx_dir = out_dir / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    Dim = torch.export.Dim
    batch, seq, past, tiles = Dim("batch", max=256), Dim("seq", max=131072), Dim("past", max=131072), Dim("tiles", max=1024)

    # Example shapes are >= 2 on every dynamic axis: the exporter specialises axes of size 0 or 1.
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
    pv = torch.from_numpy(sample_vision.tile_groups()[0]).to(dtype)
    v_args, v_names, v_shapes = (pv,), ["pixel_values"], {"pixel_values": {0: tiles}}
    if family.tiles_keep_size:  # each image at its own size: H and W (the last two axes) are dynamic
        v_shapes = {"pixel_values": {0: tiles, pv.dim() - 2: Dim.AUTO, pv.dim() - 1: Dim.AUTO}}
    elif sample_vision.pixel_attention_mask is not None:
        v_args = (pv, torch.from_numpy(sample_vision.pixel_attention_mask))
        v_names.append("pixel_attention_mask")
        if family.variable_tile_size:
            v_shapes = {"pixel_values": {0: tiles, 2: Dim.AUTO, 3: Dim.AUTO},
                        "pixel_attention_mask": {0: tiles, 1: Dim.AUTO, 2: Dim.AUTO}}
        else:
            v_shapes["pixel_attention_mask"] = {0: tiles}
    graphs = [
        ("vision", vision, v_args, v_names, ["image_features"], v_shapes),
        ("embed", embed, (torch.tensor([[1, 2, 3], [4, 5, 6]]),), ["input_ids"], ["inputs_embeds"],
         {"input_ids": {0: batch, 1: seq}}),
    ]
    B, S, P = 2, 5, 3
    names = past_names(L)
    # position_ids [batch, seq], or [3, batch, seq] for M-RoPE (Family.position_dims)
    positions = torch.arange(P, P + S).repeat(B, 1)
    position_shape = {0: batch, 1: seq}
    if family.position_dims > 1:
        positions = positions.repeat(family.position_dims, 1, 1)
        position_shape = {1: batch, 2: seq}
    graphs.append((
        "decoder", decoder,
        (torch.zeros(B, S, dims["hidden_size"], dtype=dtype), torch.ones(B, P + S, dtype=torch.long), positions,
         tuple(torch.zeros(B, dims["num_kv_heads"], P, dims["head_dim"], dtype=dtype) for _ in names)),
        ["inputs_embeds", "attention_mask", "position_ids", *names],
        ["logits", *past_names(L, "present")],
        {"inputs_embeds": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: Dim.AUTO},
         "position_ids": position_shape, "past": tuple({0: batch, 2: past} for _ in names)},
    ))
    artifacts = []
    for graph, module, args, in_names, out_names, shapes in graphs:
        path = onnx_dir / graph_file(graph, precision)
        inputs, outputs = _export_one(module, args, path, in_names, out_names, shapes)
        data = sorted(p.name for p in onnx_dir.iterdir() if p.name.startswith(path.name) and p != path)
        artifacts.append({"graph": graph, "format": "onnx", "precision": precision, "file": f"onnx/{path.name}",
                          "files": [f"onnx/{n}" for n in [path.name, *data]],
                          "inputs": inputs, "outputs": outputs})
    if fused_support(family.config) is None:  # the decoder again, in ONNX Runtime's fused layout
        path = onnx_dir / graph_file(FUSED_GRAPH, precision)
        try:
            fields = build_fused_decoder(family.config, parts.decoder, parts.lm_head, path, precision)
        except ExportError:
            raise
        except Exception as exc:  # a layer that does not map onto the table: name it
            raise ExportError(f"building the fused decoder failed: {type(exc).__name__}: {exc}") from exc
        data = sorted(p.name for p in onnx_dir.iterdir() if p.name.startswith(path.name) and p != path)
        artifacts.append({"graph": FUSED_GRAPH, "format": "onnx", "precision": precision, "file": f"onnx/{path.name}",
                          "files": [f"onnx/{n}" for n in [path.name, *data]], **fields})
    return artifacts


def example_vision_inputs(family: Family):
    from ..images import sample_images

    # Two images of one size where each image keeps its size: the graph's tile axis needs an example of 2.
    sizes = [(40, 56), (40, 56)] if family.tiles_keep_size else [(40, 56), (64, 48)]
    return family.preprocess(sample_images(2, seed=0, sizes=sizes))

