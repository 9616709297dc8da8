"""The fused decoder layout for ONNX Runtime, written straight from the text model's weights.

The plain decoder (export/onnx.py, traced by torch.onnx) appends to its KV cache by Concat, so
every step copies the whole cache, and it materialises the grouped-query head repeat: the step
time grows with the context. This graph uses ONNX Runtime's fused kernels instead:

  inputs_embeds [batch, seq, D], seqlens_k [batch] int32 (each row's total length - 1),
  total_sequence_length [] int32, last_index [batch] int64 (each row's last real position in seq),
  past_key_values.{i}.key/value [batch, kv_heads, capacity, head_dim]
  -> logits [batch, vocab] (at last_index), next_token [batch] int64 (the greedy choice: ArgMax of
     logits, taken where the logits are, so a GPU step sends one id per row to the host),
     present.{i}.key/value (the same buffers)

  per layer: SimplifiedLayerNormalization -> one QKV MatMul -> GroupQueryAttention (rotary inside,
  the new keys/values written in place into a buffer of the cache's full capacity, the runtime binds
  past and present to the same memory) -> MatMul -> SkipSimplifiedLayerNormalization (the residual
  add fused) -> SwiGLU MLP -> SkipSimplifiedLayerNormalization ...

Why built from the weights rather than by rewriting the traced graph: a Llama-style decoder is a
handful of tensors per layer (LAYER_MODULES below), so the graph is a few dozen lines of table-driven
code with no pattern matching against an exporter's output that changes between torch releases, it
needs no trace (no second copy of the model in the exporter's IR: memory bounded by one tensor), and
it is the route onnxruntime-genai's builder takes. The plain graph stays in the bundle: TensorRT and
stock ONNX tools read it, and it is what this layout is verified against.

Adding a decoder: its layers must map onto LAYER_MODULES (a Llama/Mistral-style block), `fused_support`
says what else it must satisfy, and tests/test_fused_decoder.py runs it against the PyTorch reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportError
from ..manifest import FUSED_DECODER

GRAPH = FUSED_DECODER  # the bundle's name for this graph

ONNX_OPSET = 17
# Module paths within one decoder layer of a Llama-style text model (LlamaModel, MistralModel), by role.
LAYER_MODULES = {
    "attn_norm": "input_layernorm",
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}
# Text model types whose decoder layers are LAYER_MODULES with SiLU-gated MLPs and half-split rotary.
MODEL_TYPES = ("llama", "mistral")
# ORT's GroupQueryAttention CPU kernel takes head sizes in multiples of 16.
HEAD_DIM_MULTIPLE = 16
# Weights above this go to <graph>.data (as the traced graphs: export/onnx.EXTERNAL_DATA_BYTES).
EXTERNAL_DATA_BYTES = 64 << 20
# Offsets in the external data are page aligned, so ONNX Runtime can map every tensor.
_ALIGN = 4096
_EMBEDDED_BYTES = 1024


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config") or config


def fused_support(config: dict[str, Any]) -> str | None:
    """None when this checkpoint's decoder can be built in the fused layout, else why not."""
    tc = _text_config(config)
    if (tc.get("rope_parameters") or tc.get("rope_scaling") or {}).get("mrope_section"):
        return "M-RoPE positions (three rotary sections; GroupQueryAttention rotates by one position per token)"
    kind = tc.get("model_type", "llama")
    if kind not in MODEL_TYPES:
        return f"text model type {kind!r} (the fused layout takes {', '.join(MODEL_TYPES)})"
    if tc.get("hidden_act", "silu") != "silu":
        return f"activation {tc.get('hidden_act')!r} (SwiGLU with silu only)"
    heads = tc["num_attention_heads"]
    head_dim = tc.get("head_dim") or tc["hidden_size"] // heads
    if head_dim % HEAD_DIM_MULTIPLE:
        return f"head size {head_dim} (ONNX Runtime's GroupQueryAttention takes multiples of {HEAD_DIM_MULTIPLE})"
    if tc.get("partial_rotary_factor", 1.0) != 1.0:
        return "partial rotary embeddings"
    return None


class _Weights:
    """Initializers written one at a time: into <graph>.data at page-aligned offsets when the graph
    is large (the TensorProto keeps only where), else embedded."""

    def __init__(self, path: Path, external: bool):
        self.path, self.external = path, external
        self.location = f"{path.name}.data"
        self.file = open(path.parent / self.location, "wb") if external else None
        self.tensors: list = []

    def add(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        array = np.ascontiguousarray(array)
        # Small tensors stay in the graph: ONNX Runtime reads shape arguments (Unsqueeze's axes) at load,
        # before external data.
        if not self.external or array.nbytes < _EMBEDDED_BYTES:
            self.tensors.append(numpy_helper.from_array(array, name))
            return name
        start = self._align()
        self.file.write(memoryview(array.reshape(-1)).cast("B"))  # no bytes copy of a 1 GB lm_head
        return self._external(name, list(array.shape), array.dtype, start, array.nbytes)

    def _align(self) -> int:
        self.file.write(b"\0" * (-self.file.tell() % _ALIGN))
        return self.file.tell()

    def _external(self, name: str, dims: list[int], dtype, start: int, nbytes: int) -> str:
        """The TensorProto of bytes written at `start`: only where they are."""
        from onnx import TensorProto, helper

        t = TensorProto(name=name, dims=dims, data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(start)), ("length", str(nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self.tensors.append(t)
        return name

    def add_transposed(self, name: str, array: np.ndarray, block_bytes: int = 64 << 20) -> str:
        """`array.T`, written a block of its rows at a time: a 1 GB lm_head is transposed without a
        second 1 GB copy in memory."""
        rows, cols = array.shape
        if not self.external or array.nbytes < _EMBEDDED_BYTES:
            return self.add(name, array.T)
        start = self._align()
        step = max(1, block_bytes // max(1, rows * array.itemsize))
        for c in range(0, cols, step):   # rows c.. of the transpose are columns c.. of the array
            self.file.write(memoryview(np.ascontiguousarray(array[:, c:c + step].T).reshape(-1)).cast("B"))
        return self._external(name, [cols, rows], array.dtype, start, array.nbytes)

    def close(self) -> None:
        if self.file:
            self.file.close()


def _module(root, dotted: str):
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def _np(tensor, dtype) -> np.ndarray:
    return tensor.detach().to("cpu").float().numpy().astype(dtype, copy=False)


def rotary_tables(decoder, max_positions: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, head_dim / 2] from the model's own rotary module (its rope scaling,
    llama3 or other, and attention scaling included), as GroupQueryAttention takes them."""
    import torch

    probe = torch.zeros(1, 1, head_dim, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = decoder.rotary_emb(probe, torch.arange(max_positions)[None])
    half = head_dim // 2
    cos, sin = cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()
    return np.ascontiguousarray(cos), np.ascontiguousarray(sin)


def io_description(dims: dict[str, int], dtype: str) -> tuple[list[dict], list[dict]]:
    """The graph's inputs and outputs, as the manifest records them."""
    kv = lambda name: {"name": name, "dtype": dtype,  # noqa: E731
                       "shape": ["batch", dims["num_kv_heads"], "capacity", dims["head_dim"]]}
    n = dims["num_layers"]
    inputs = [{"name": "inputs_embeds", "dtype": dtype, "shape": ["batch", "seq", dims["hidden_size"]]},
              {"name": "seqlens_k", "dtype": "int32", "shape": ["batch"]},
              {"name": "total_sequence_length", "dtype": "int32", "shape": []},
              {"name": "last_index", "dtype": "int64", "shape": ["batch"]}]
    inputs += [kv(f"past_key_values.{i}.{k}") for i in range(n) for k in ("key", "value")]
    outputs = [{"name": "logits", "dtype": dtype, "shape": ["batch", dims["vocab_size"]]},
               {"name": "next_token", "dtype": "int64", "shape": ["batch"]}]
    outputs += [kv(f"present.{i}.{k}") for i in range(n) for k in ("key", "value")]
    return inputs, outputs


def build_fused_decoder(config: dict[str, Any], decoder, lm_head, path: Path, precision: str = "fp32",
                        max_positions: int | None = None) -> dict[str, Any]:
    """Write the fused decoder of `decoder` (the HF text model, no lm_head) and `lm_head` at `path`
    (weights in `precision`: fp32 or fp16); return its artifact fields (inputs, outputs, max_context)."""
    import onnx
    from onnx import TensorProto, helper

    why = fused_support(config)
    if why:
        raise ExportError(f"the fused decoder layout does not take this model: {why}")
    tc = _text_config(config)
    heads, hidden = tc["num_attention_heads"], tc["hidden_size"]
    kv_heads = tc.get("num_key_value_heads") or heads
    head_dim = tc.get("head_dim") or hidden // heads
    n_layers, vocab = tc["num_hidden_layers"], tc["vocab_size"]
    eps = float(tc.get("rms_norm_eps", 1e-6))
    window = tc.get("sliding_window") if tc.get("use_sliding_window", True) else None
    max_positions = int(max_positions or tc.get("max_position_embeddings", 4096))
    dtype = {"fp32": np.float32, "fp16": np.float16}[precision]
    elem = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}[precision]
    dims = {"num_layers": n_layers, "num_kv_heads": kv_heads, "head_dim": head_dim, "hidden_size": hidden,
            "vocab_size": vocab}

    params = sum(p.numel() for p in decoder.parameters()) + lm_head.weight.numel()
    weights = _Weights(path, params * np.dtype(dtype).itemsize > EXTERNAL_DATA_BYTES)
    nodes: list = []

    def linear(x: str, module, name: str, transposed: str) -> str:
        """x @ W.T (+ b) with W stored transposed ([in, out]) as MatMul takes it."""
        w = weights.add(transposed, _np(module.weight, dtype).T)
        nodes.append(helper.make_node("MatMul", [x, w], [f"{name}_mm"], name=f"{name}/MatMul"))
        if getattr(module, "bias", None) is None:
            return f"{name}_mm"
        b = weights.add(f"{transposed}.bias", _np(module.bias, dtype))
        nodes.append(helper.make_node("Add", [f"{name}_mm", b], [name], name=f"{name}/Add"))
        return name

    try:
        cos, sin = rotary_tables(decoder, max_positions, head_dim)
        cos_name, sin_name = weights.add("rotary.cos", cos.astype(dtype)), weights.add("rotary.sin", sin.astype(dtype))
        layers = decoder.layers
        norms = [_module(layers[i], LAYER_MODULES["attn_norm"]) for i in range(n_layers)] + [decoder.norm]
        gamma = lambda i, module: weights.add(f"{i}.norm.weight", _np(module.weight, dtype))  # noqa: E731
        nodes.append(helper.make_node("SimplifiedLayerNormalization", ["inputs_embeds", gamma("layers.0.attn", norms[0])],
                                      ["layers.0.attn_in"], name="layers.0/attn_norm", axis=-1, epsilon=eps,
                                      stash_type=1))
        x, residual = "layers.0.attn_in", "inputs_embeds"
        for i in range(n_layers):
            layer, p = layers[i], f"layers.{i}"
            part = {role: _module(layer, path_) for role, path_ in LAYER_MODULES.items()}
            # One QKV matmul: [D, (heads + 2 kv_heads) * head_dim]; GroupQueryAttention splits it.
            qkv_w = np.concatenate([_np(part[r].weight, dtype) for r in ("q", "k", "v")], 0).T
            nodes.append(helper.make_node("MatMul", [x, weights.add(f"{p}.qkv.weight", qkv_w)], [f"{p}.qkv_mm"],
                                          name=f"{p}/qkv/MatMul"))
            del qkv_w
            qkv = f"{p}.qkv_mm"
            if part["q"].bias is not None:
                bias = np.concatenate([_np(part[r].bias, dtype) for r in ("q", "k", "v")])
                nodes.append(helper.make_node("Add", [qkv, weights.add(f"{p}.qkv.bias", bias)], [f"{p}.qkv"],
                                              name=f"{p}/qkv/Add"))
                qkv = f"{p}.qkv"
            attrs = dict(num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0,
                         scale=float(head_dim ** -0.5))
            if window:
                attrs["local_window_size"] = int(window)
            nodes.append(helper.make_node(
                "GroupQueryAttention",
                [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
                 "total_sequence_length", cos_name, sin_name],
                [f"{p}.attn", f"present.{i}.key", f"present.{i}.value"], name=f"{p}/GroupQueryAttention",
                domain="com.microsoft", **attrs))
            attn_out = linear(f"{p}.attn", part["o"], f"{p}.o", f"{p}.o.weight")
            nodes.append(helper.make_node(
                "SkipSimplifiedLayerNormalization", [attn_out, residual, gamma(f"{p}.ffn", part["ffn_norm"])],
                [f"{p}.ffn_in", "", "", f"{p}.resid_attn"], name=f"{p}/ffn_norm", domain="com.microsoft",
                epsilon=eps))
            gate = linear(f"{p}.ffn_in", part["gate"], f"{p}.gate", f"{p}.gate.weight")
            up = linear(f"{p}.ffn_in", part["up"], f"{p}.up", f"{p}.up.weight")
            nodes += [helper.make_node("Sigmoid", [gate], [f"{p}.gate_sig"], name=f"{p}/silu/Sigmoid"),
                      helper.make_node("Mul", [gate, f"{p}.gate_sig"], [f"{p}.gate_act"], name=f"{p}/silu/Mul"),
                      helper.make_node("Mul", [f"{p}.gate_act", up], [f"{p}.ffn_mid"], name=f"{p}/swiglu/Mul")]
            down = linear(f"{p}.ffn_mid", part["down"], f"{p}.down", f"{p}.down.weight")
            nxt = f"layers.{i + 1}.attn_in" if i + 1 < n_layers else "final_norm"
            nodes.append(helper.make_node(
                "SkipSimplifiedLayerNormalization",
                [down, f"{p}.resid_attn", gamma(f"layers.{i + 1}.attn" if i + 1 < n_layers else "final", norms[i + 1])],
                [nxt, "", "", f"{p}.resid_ffn"], name=f"{p}/next_norm", domain="com.microsoft", epsilon=eps))
            x, residual = nxt, f"{p}.resid_ffn"
        # Each row's last real position only (rows of a batched prompt are right-padded to one length).
        nodes += [helper.make_node("Unsqueeze", ["last_index", weights.add("axis_last", np.array([-1], np.int64))],
                                   ["last_index_2d"], name="last_position/Unsqueeze"),
                  helper.make_node("GatherND", [x, "last_index_2d"], ["last_hidden"], name="last_position/GatherND",
                                   batch_dims=1)]
        # The lm_head as a MatMul on [D, vocab], not a Gemm with transB on [vocab, D]: for one row at a
        # time ONNX Runtime's CPU kernel reads this layout faster, most without prepacked weights (the
        # large graphs'): the suite's 60m decode step, 1 thread, 9.5 -> 7.6 ms unpacked, 8.4 -> 7.8 ms
        # prepacked. It is the largest weight a step reads.
        head = weights.add_transposed("lm_head.weight", _np(lm_head.weight, dtype))   # [D, vocab]
        if getattr(lm_head, "bias", None) is not None:
            nodes.append(helper.make_node("MatMul", ["last_hidden", head], ["lm_head.out"], name="lm_head/MatMul"))
            nodes.append(helper.make_node("Add", ["lm_head.out", weights.add("lm_head.bias", _np(lm_head.bias, dtype))],
                                          ["logits"], name="lm_head/Add"))
        else:
            nodes.append(helper.make_node("MatMul", ["last_hidden", head], ["logits"], name="lm_head/MatMul"))
        # Ties go to the lowest id, as numpy's argmax (ONNX ArgMax, select_last_index 0).
        nodes.append(helper.make_node("ArgMax", ["logits"], ["next_token"], name="greedy/ArgMax", axis=-1,
                                      keepdims=0))
    finally:
        weights.close()

    inputs, outputs = io_description(dims, "float16" if precision == "fp16" else "float32")
    types = {"float32": elem, "float16": elem, "int32": TensorProto.INT32, "int64": TensorProto.INT64}
    value_info = lambda d: helper.make_tensor_value_info(d["name"], types[d["dtype"]], d["shape"])  # noqa: E731
    graph = helper.make_graph(nodes, "edgelmm_decoder_fused", [value_info(d) for d in inputs],
                              [value_info(d) for d in outputs], weights.tensors)
    model = helper.make_model(graph, producer_name="edgelmm", ir_version=10,
                              opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path))
    return {"inputs": inputs, "outputs": outputs, "layout": "fused", "max_context": max_positions}
