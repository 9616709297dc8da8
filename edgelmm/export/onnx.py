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
                               position_ids=position_ids, past_key_values=cache, use_cache=True)
            # lm_head on the last position only: over every position it dominates prefill.
            logits = self.lm_head(out.last_hidden_state[:, -1, :])
            present = []
            for layer in out.past_key_values.layers[:num_layers]:
                present += [layer.keys, layer.values]
            return (logits, *present)

    return Vision(), Embed(), Decoder()


def _io(path: Path) -> tuple[list[dict], list[dict]]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def desc(v):
        t = v.type.tensor_type
        return {"name": v.name, "dtype": _DTYPES.get(t.elem_type, str(t.elem_type)),
                "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}
    return [desc(v) for v in m.graph.input], [desc(v) for v in m.graph.output]


def _export_one(module, args, path: Path, input_names, output_names, dynamic_shapes, large: bool) -> None:
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module.eval(), args, None, dynamo=True, input_names=input_names,
                                        output_names=output_names, dynamic_shapes=dynamic_shapes,
                                        opset_version=ONNX_OPSET, optimize=True, verbose=False)
        program.save(str(path), external_data=large)
    except Exception as exc:  # the exporter raises many types; the user needs to know which graph failed
        raise ExportError(f"torch.onnx.export failed on the {path.stem} graph: {type(exc).__name__}: {exc}") from exc


def fold_reciprocal_sqrt(path: Path) -> int:
    """Rewrite x * Reciprocal(Sqrt(v)) as x / Sqrt(v) in the graph at `path`; return how many.

    The exporter writes RMSNorm's rsqrt as Sqrt -> Reciprocal -> Mul, a pattern ONNX Runtime's
    SimplifiedLayerNormFusion does not match; as Sqrt -> Div it fuses every RMSNorm into one
    SimplifiedLayerNormalization kernel at session load (reference decoder: 326 -> 272 nodes,
    0.416 -> 0.379 ms per decode step on 1 thread). Still plain ONNX, so TensorRT parses it as before."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # weights stay where they are
    nodes = model.graph.node
    producer = {out: n for n in nodes for out in n.output}
    users: dict[str, list] = {}
    for n in nodes:
        for name in n.input:
            users.setdefault(name, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}
    folded = []
    for rec in nodes:
        sqrt = producer.get(rec.input[0]) if rec.op_type == "Reciprocal" else None
        uses = users.get(rec.output[0], []) if sqrt is not None else []
        if sqrt is None or sqrt.op_type != "Sqrt" or not uses or rec.output[0] in graph_outputs \
                or any(u.op_type != "Mul" or list(u.input).count(rec.output[0]) != 1 for u in uses):
            continue
        for mul in uses:
            other = next(i for i in mul.input if i != rec.output[0])
            mul.op_type = "Div"
            del mul.input[:]
            mul.input.extend([other, sqrt.output[0]])
        folded.append(rec)
    if folded:
        for rec in folded:
            nodes.remove(rec)
        onnx.save(model, str(path))
    return len(folded)


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
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > 1_500_000_000
    Dim = torch.export.Dim
    batch, seq, past, tiles = Dim("batch", max=256), Dim("seq", max=131072), Dim("past", max=131072), Dim("tiles", max=1024)

    # Example shapes are >= 2 on every dynamic axis: the exporter specialises axes of size 0 or 1.
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
    pv = torch.from_numpy(sample_vision.pixel_values).to(dtype)
    v_args, v_names, v_shapes = (pv,), ["pixel_values"], {"pixel_values": {0: tiles}}
    if sample_vision.pixel_attention_mask is not None:
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
    graphs.append((
        "decoder", decoder,
        (torch.zeros(B, S, dims["hidden_size"], dtype=dtype), torch.ones(B, P + S, dtype=torch.long),
         torch.arange(P, P + S).repeat(B, 1),
         tuple(torch.zeros(B, dims["num_kv_heads"], P, dims["head_dim"], dtype=dtype) for _ in names)),
        ["inputs_embeds", "attention_mask", "position_ids", *names],
        ["logits", *past_names(L, "present")],
        {"inputs_embeds": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: Dim.AUTO},
         "position_ids": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past} for _ in names)},
    ))
    artifacts = []
    for graph, module, args, in_names, out_names, shapes in graphs:
        path = onnx_dir / graph_file(graph, precision)
        _export_one(module, args, path, in_names, out_names, shapes, large)
        fold_reciprocal_sqrt(path)
        inputs, outputs = _io(path)
        data = sorted(p.name for p in onnx_dir.iterdir() if p.name.startswith(path.name) and p != path)
        artifacts.append({"graph": graph, "format": "onnx", "precision": precision, "file": f"onnx/{path.name}",
                          "files": [f"onnx/{n}" for n in [path.name, *data]],
                          "inputs": inputs, "outputs": outputs})
    return artifacts


def example_vision_inputs(family: Family):
    from ..testing.checkpoints import sample_images

    return family.preprocess(sample_images(2, seed=0, sizes=[(40, 56), (64, 48)]))

