"""Where each llama.cpp GGUF tensor comes from in a Hugging Face model: one table per architecture,
walked by the GGUF writer (export/gguf.py), instead of code per attribute.

A rule names the llama.cpp tensor ("{i}" for the block index), the attribute path it is read from
(relative to the decoder layer, the vision block, the vision tower or the whole model, as the table
says), the transform that turns the HF layout into llama.cpp's (a name the writer implements), and
whether the tensor may be absent. The names are llama.cpp's (gguf-py's constants: token_embd,
blk.N.attn_q, v.blk.N.ln1, mm.0, ...); the keys beside them are written by the writer from the
config. Data only (no numpy, no torch): families import these tables on the device side too.

Adding a text architecture: a TextArch with its block table and the HF model types it reads; the
validator (gguf_file.py) gets its keys and tensors. Adding a vision tower: its tower and block tables,
used by the family's GGUFPlan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class TensorRule(NamedTuple):
    gguf: str                # llama.cpp's name; "{i}" is the block index
    source: str              # attribute path in the HF module the table is relative to
    transform: str = ""      # export/gguf.py TRANSFORMS: how HF's layout becomes llama.cpp's
    optional: bool = False   # absent (or None) in some models of the architecture: skipped
    keep_f32: bool = False   # F32 in every GGUF type (position embeddings)


def rules(*entries: tuple) -> tuple[TensorRule, ...]:
    return tuple(TensorRule(*e) for e in entries)


# ------------------------------------------------------------------------------ text (LLM GGUF)

@dataclass(frozen=True)
class TextArch:
    """A llama.cpp text architecture: its GGUF name (the metadata key prefix), the HF text model types
    it reads, and its decoder layer's tensors. Model-level tensors (token_embd, output_norm, output)
    are the same for every architecture here."""
    name: str
    model_types: tuple[str, ...]
    block: tuple[TensorRule, ...]
    mrope: bool = False      # rope.dimension_sections from the config's mrope_section (M-RoPE)


_LLAMA_FFN = rules(
    ("blk.{i}.ffn_norm.weight", "post_attention_layernorm.weight"),
    ("blk.{i}.ffn_gate.weight", "mlp.gate_proj.weight"),
    ("blk.{i}.ffn_up.weight", "mlp.up_proj.weight"),
    ("blk.{i}.ffn_down.weight", "mlp.down_proj.weight"),
)

LLAMA = TextArch("llama", ("llama",), rules(
    ("blk.{i}.attn_norm.weight", "input_layernorm.weight"),
    # llama.cpp's llama graph rotates interleaved pairs; HF's rotates halves: Q/K rows are permuted.
    ("blk.{i}.attn_q.weight", "self_attn.q_proj.weight", "rope_pairs_q"),
    ("blk.{i}.attn_k.weight", "self_attn.k_proj.weight", "rope_pairs_kv"),
    ("blk.{i}.attn_v.weight", "self_attn.v_proj.weight"),
    ("blk.{i}.attn_output.weight", "self_attn.o_proj.weight"),
) + _LLAMA_FFN)

# Qwen2-VL / Qwen2.5-VL's text model: Qwen2 (Q/K/V biases) with M-RoPE; llama.cpp rotates halves
# (NEOX order) there, as HF does, so nothing is permuted.
QWEN2VL = TextArch("qwen2vl", ("qwen2_vl_text", "qwen2_5_vl_text", "qwen2_vl", "qwen2_5_vl"), rules(
    ("blk.{i}.attn_norm.weight", "input_layernorm.weight"),
    ("blk.{i}.attn_q.weight", "self_attn.q_proj.weight"),
    ("blk.{i}.attn_q.bias", "self_attn.q_proj.bias"),
    ("blk.{i}.attn_k.weight", "self_attn.k_proj.weight"),
    ("blk.{i}.attn_k.bias", "self_attn.k_proj.bias"),
    ("blk.{i}.attn_v.weight", "self_attn.v_proj.weight"),
    ("blk.{i}.attn_v.bias", "self_attn.v_proj.bias"),
    ("blk.{i}.attn_output.weight", "self_attn.o_proj.weight"),
) + _LLAMA_FFN, mrope=True)

TEXT_ARCHES = {arch.name: arch for arch in (LLAMA, QWEN2VL)}


def block_linears(arch: TextArch) -> dict[str, str]:
    """A decoder layer's linear modules (HF path) -> their GGUF weight names ("blk.{i}.attn_q.weight"):
    what llama.cpp's importance matrix is keyed by."""
    return {rule.source.removesuffix(".weight"): rule.gguf for rule in arch.block
            if rule.gguf.endswith(".weight") and "norm" not in rule.gguf}


# ------------------------------------------------------------------------------ vision (mmproj GGUF)

# SigLIP / CLIP towers (LLaVA, Idefics3): tower tables are relative to the vision transformer,
# block tables to one encoder layer.
SIGLIP_TOWER = rules(
    ("v.patch_embd.weight", "embeddings.patch_embedding.weight"),
    ("v.patch_embd.bias", "embeddings.patch_embedding.bias", "", True),          # CLIP has none
    ("v.position_embd.weight", "embeddings.position_embedding.weight", "", False, True),
    ("v.class_embd", "embeddings.class_embedding", "", True),                     # CLIP's CLS token
    ("v.pre_ln.weight", "pre_layrnorm.weight", "", True),                        # (sic) HF's CLIP spelling
    ("v.pre_ln.bias", "pre_layrnorm.bias", "", True),
)
SIGLIP_BLOCK = rules(*((f"v.blk.{{i}}.{ours}.{part}", f"{theirs}.{part}")
                       for ours, theirs in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                                            ("attn_v", "self_attn.v_proj"), ("attn_out", "self_attn.out_proj"),
                                            ("ffn_up", "mlp.fc1"), ("ffn_down", "mlp.fc2"),
                                            ("ln1", "layer_norm1"), ("ln2", "layer_norm2"))
                       for part in ("weight", "bias")))

# Qwen2-VL's tower (relative to model.visual): the Conv3d over a frame pair becomes two 2-D kernels
# (llama.cpp convolves each frame and adds), the merger's LayerNorm is v.post_ln and its MLP mm.0/mm.2.
QWEN2VL_TOWER = rules(
    ("v.patch_embd.weight", "patch_embed.proj.weight", "frame_0"),
    ("v.patch_embd.weight.1", "patch_embed.proj.weight", "frame_1"),
    ("v.post_ln.weight", "merger.ln_q.weight"),
    ("v.post_ln.bias", "merger.ln_q.bias", "", True),                            # Qwen2.5's RMSNorm: none
    ("mm.0.weight", "merger.mlp.0.weight"),
    ("mm.0.bias", "merger.mlp.0.bias"),
    ("mm.2.weight", "merger.mlp.2.weight"),
    ("mm.2.bias", "merger.mlp.2.bias"),
)
# One fused QKV projection in HF, three in llama.cpp.
_QWEN2VL_ATTENTION = rules(*((f"v.blk.{{i}}.attn_{x}.{part}", f"attn.qkv.{part}", f"third_{n}")
                             for n, x in enumerate("qkv") for part in ("weight", "bias"))) + rules(
    ("v.blk.{i}.attn_out.weight", "attn.proj.weight"),
    ("v.blk.{i}.attn_out.bias", "attn.proj.bias"),
)
QWEN2VL_BLOCK = _QWEN2VL_ATTENTION + rules(
    ("v.blk.{i}.ln1.weight", "norm1.weight"), ("v.blk.{i}.ln1.bias", "norm1.bias"),
    ("v.blk.{i}.ln2.weight", "norm2.weight"), ("v.blk.{i}.ln2.bias", "norm2.bias"),
    ("v.blk.{i}.ffn_up.weight", "mlp.fc1.weight"), ("v.blk.{i}.ffn_up.bias", "mlp.fc1.bias"),
    ("v.blk.{i}.ffn_down.weight", "mlp.fc2.weight"), ("v.blk.{i}.ffn_down.bias", "mlp.fc2.bias"),
)
# Qwen2.5-VL: RMSNorms (no bias) and a gated SiLU MLP.
QWEN25VL_BLOCK = _QWEN2VL_ATTENTION + rules(
    ("v.blk.{i}.ln1.weight", "norm1.weight"),
    ("v.blk.{i}.ln2.weight", "norm2.weight"),
    ("v.blk.{i}.ffn_gate.weight", "mlp.gate_proj.weight"), ("v.blk.{i}.ffn_gate.bias", "mlp.gate_proj.bias"),
    ("v.blk.{i}.ffn_up.weight", "mlp.up_proj.weight"), ("v.blk.{i}.ffn_up.bias", "mlp.up_proj.bias"),
    ("v.blk.{i}.ffn_down.weight", "mlp.down_proj.weight"), ("v.blk.{i}.ffn_down.bias", "mlp.down_proj.bias"),
)
