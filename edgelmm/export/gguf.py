"""GGUF for llama.cpp: the language model as an LLM GGUF (architecture "llama", or "qwen2vl" for
Qwen2-VL's M-RoPE text model) and the vision tower + projector as an mmproj GGUF (architecture
"clip"), written with gguf-py directly, by walking the tables of gguf_names.py that the family's
GGUFPlan names.

Names, keys and layouts follow what llama.cpp's loaders read (src/llama-model.cpp, src/models/ and
tools/mtmd/clip.cpp):
  - Llama Q/K projection rows are permuted from HF's rotate-half layout to llama.cpp's
    interleaved rope layout; every other matrix keeps its [out, in] layout (Qwen2-VL's fused QKV
    is cut in three, its Conv3d patch kernel into one 2-D kernel per frame).
  - 1-D tensors (norms, biases) stay F32 in every type, as llama.cpp's own converter writes them.
  - F32 / F16 / Q8_0 are written here (gguf-py's Q8_0 is byte-identical to llama.cpp's);
    Q4_K_M goes through llama.cpp's own quantizer (k-quants have no Python implementation),
    which falls back to Q5_0/Q8_0 for rows that are not a multiple of 256.

What llama.cpp cannot represent is refused with an ExportError that says why:
  - Idefics2 (perceiver resampler): llama.cpp has no projector for it.
  - LLaVA with a CLIP tower (a CLS token): llama.cpp's llava graph appends the class embedding
    after the patches instead of before them, so every position embedding is off by one and the
    image features are wrong (cosine ~0.6 against PyTorch). Refused unless forced; verify then
    shows the damage.
  - Qwen2.5-VL whose windows are not 112 pixels, or whose full-attention layers are not every n-th
    (llama.cpp's qwen2.5vl_merger assumes both); see Qwen2VLFamily.gguf_refusal.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ExportError
from ..families import Family
from ..families.base import ClipShape
from ..gguf_names import LLAMA, TEXT_ARCHES, TensorRule
from ..options import default_threads

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_k_m")
# The mmproj type beside each LLM type. Quantized LLMs get a Q8_0 projector (the patch convolution
# stays F16, norms and positions F32): SigLIP-so400m is 0.84 GB in F16 beside a 0.8 GB Q4_K_M
# Llama-3.2-1B, and Q8_0 halves it within verify's vision cosine gate of 0.999.
MMPROJ_TYPE = {"f32": "f32", "f16": "f16", "q8_0": "q8_0", "q4_k_m": "q8_0"}
LLAMA_FTYPE = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15}  # llama_ftype values (general.file_type)


def llm_file(gguf_type: str) -> str:
    return f"gguf/model.{gguf_type}.gguf"


def mmproj_file(gguf_type: str) -> str:
    return f"gguf/mmproj.{MMPROJ_TYPE[gguf_type]}.gguf"


@dataclass
class GGUFSupport:
    supported: bool
    reason: str = ""
    forceable: bool = False


def gguf_support(family: Family) -> GGUFSupport:
    """Can llama.cpp represent this model (LLM + mmproj)? The family says which text architecture
    and projector it maps to (Family.gguf_plan) and what llama.cpp cannot do (Family.gguf_refusal);
    the text architecture's table says which HF text models it reads."""
    text = family.config.get("text_config") or {}
    refusal = family.gguf_refusal()
    if refusal is not None and not refusal.forceable:
        return GGUFSupport(False, refusal.reason)
    plan = family.gguf_plan()
    if plan is None:
        return GGUFSupport(False, f"llama.cpp has no projector for the {family.name} family here")
    arch = TEXT_ARCHES.get(plan.text_arch)
    model_type = text.get("model_type", "llama")
    if arch is None or model_type not in arch.model_types:
        return GGUFSupport(False, f"text model type {model_type!r} has no GGUF writer here for llama.cpp's "
                                  f"{plan.text_arch!r} architecture")
    if arch is LLAMA and (text.get("attention_bias") or text.get("mlp_bias")):
        return GGUFSupport(False, "the text model has attention/MLP biases, which llama.cpp's llama graph does not load")
    shape = plan.shape or ClipShape.from_vision_config(family.config["vision_config"])
    if shape.ffn == shape.width:
        return GGUFSupport(False, f"the vision MLP is as wide as the tower ({shape.width}): llama.cpp takes such a "
                                  "projector file for a legacy one with the MLP's matrices swapped")
    if refusal is not None:
        return GGUFSupport(False, refusal.reason, forceable=True)
    return GGUFSupport(True)


# ---------------------------------------------------------------------------------------- helpers

def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp's interleaved pairs (per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _transforms(n_head: int = 0, n_kv: int = 0) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """gguf_names' transform names: HF layout -> llama.cpp's."""
    def third(k):
        return lambda w: np.split(w, 3, axis=0)[k]   # a fused [q; k; v] projection's k-th part

    return {"": lambda w: w,
            "rope_pairs_q": lambda w: _permute_rope(w, n_head),
            "rope_pairs_kv": lambda w: _permute_rope(w, n_kv),
            "frame_0": lambda w: w[:, :, 0], "frame_1": lambda w: w[:, :, 1],   # Conv3d [out, in, t, h, w]
            "third_0": third(0), "third_1": third(1), "third_2": third(2)}


def _write_rules(sink: "_TensorSink", table, root, transforms, index: int | None = None) -> None:
    """Write a gguf_names table's tensors, read from the module `root` (block `index` if given)."""
    for rule in table:
        rule = TensorRule(*rule)
        value = _attribute(root, rule.source, missing_ok=rule.optional)
        if value is None:
            if rule.optional:
                continue
            raise ExportError(f"GGUF writer: the model has no {rule.source} for {rule.gguf}")
        name = rule.gguf.format(i=index)
        sink.add(name, transforms[rule.transform](_np(value)), keep_f32=rule.keep_f32)


class _Deferred:
    """What GGUFWriter reads of a tensor (shape, dtype, nbytes, tofile) with the conversion done only
    when the tensor is written: the file's f16/q8_0 copy of the model never sits in memory whole,
    only one tensor of it at a time."""

    def __init__(self, source: np.ndarray, convert, shape: tuple[int, ...], dtype, nbytes: int):
        self.source, self.convert, self.shape, self.dtype, self.nbytes = source, convert, shape, np.dtype(dtype), nbytes

    def tofile(self, f) -> None:
        out = self.convert(self.source)
        if out.nbytes != self.nbytes or out.dtype != self.dtype:  # the header already promised these
            raise ExportError(f"GGUF writer: a tensor converted to {out.dtype} x {out.nbytes} bytes, "
                              f"not the {self.dtype} x {self.nbytes} its header says")
        out.tofile(f)


class _TensorSink:
    """Adds tensors to a GGUFWriter in the requested type: 1-D always F32; 2-D+ as F32/F16/Q8_0
    (Q8_0 where the row is a whole number of 32-wide blocks, else F16). Converted when written."""

    def __init__(self, writer, wtype: str):
        import gguf

        self.gguf, self.writer, self.wtype = gguf, writer, wtype

    def add(self, name: str, array: np.ndarray, keep_f32: bool = False) -> None:
        a = np.ascontiguousarray(array, dtype=np.float32)  # a view of the torch weight where it can be
        q = self.gguf.GGMLQuantizationType
        if a.ndim <= 1 or keep_f32 or self.wtype == "f32":
            self.writer.add_tensor(name, a)
        elif self.wtype == "q8_0" and a.shape[-1] % 32 == 0:
            shape = (*a.shape[:-1], a.shape[-1] // 32 * 34)  # 32 weights -> an f16 scale and 32 int8
            self.writer.add_tensor(name, _Deferred(a, lambda x: self.gguf.quants.quantize(x, q.Q8_0), shape, np.uint8,
                                                   int(np.prod(shape))), raw_shape=shape, raw_dtype=q.Q8_0)
        else:
            self.writer.add_tensor(name, _Deferred(a, lambda x: x.astype(np.float16), a.shape, np.float16, a.size * 2))


# ---------------------------------------------------------------------------------------- tokenizer

# Pre-tokenizer regexes of the byte-level BPE families llama.cpp knows, by its "tokenizer.ggml.pre" name.
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                   r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_PATTERN = _LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")   # Qwen2: one digit at a time


def _byte_level_pre(tok: dict[str, Any]) -> str:
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        kinds = [p.get("type") for p in steps]
        splits = [p for p in steps if p.get("type") == "Split"]
        regex = (splits[0].get("pattern") or {}).get("Regex") if splits else None
        if regex == _LLAMA3_PATTERN:
            return "llama-bpe"
        if regex == _QWEN2_PATTERN:
            return "qwen2"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
            return "smollm"  # SmolLM / SmolVLM: single digits, then GPT-2 byte-level
    raise ExportError("the tokenizer's pre-tokenizer is not one edgelmm maps to llama.cpp's (GPT-2 byte-level, "
                      f"Llama-3's or Qwen2's split regex, SmolLM's digits + byte-level): {json.dumps(pre)[:200]}")


def _adds_space_prefix(tok: dict[str, Any]) -> bool:
    """Does the HF tokenizer put '▁' before the first word (sentencepiece's add_dummy_prefix)? Older
    tokenizer.json files do it with a Prepend normalizer, newer ones with a Metaspace pre-tokenizer."""
    normalizer = json.dumps(tok.get("normalizer") or {})
    pre = tok.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    metaspace = any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
                    and p.get("add_prefix_space", True) for p in pres)
    return '"Prepend"' in normalizer or metaspace


def _special_ids(files) -> dict[str, int | None]:
    def tid(name):
        value = files.special_token(name)
        return files.token_id(value) if value else None

    return {"bos": tid("bos_token"), "unk": tid("unk_token"), "pad": tid("pad_token")}


def _adds_bos(files) -> bool:
    bos = files.special_token("bos_token")
    if not bos:
        return False
    return files.tokenizer.encode("a", add_special_tokens=True).ids[:1] == [files.token_id(bos)]


def write_tokenizer(writer, files, vocab_size: int) -> dict[str, Any]:
    """Write the checkpoint's tokenizer into the GGUF so stock llama.cpp tokenizes like HF.
    A sentencepiece model (tokenizer.model) becomes llama.cpp's "llama" vocab, a byte-level
    BPE tokenizer.json its "gpt2" vocab. Returns what was written (for the manifest)."""
    import gguf

    tok_json = json.loads((files.root / "tokenizer.json").read_text(encoding="utf-8"))
    added = {t["id"]: t for t in tok_json.get("added_tokens", [])}
    tokens: list[str] = []
    types: list[int] = []
    sp_path = files.root / "tokenizer.model"
    if sp_path.is_file():
        try:
            import sentencepiece as spm
        except ImportError:
            raise ExportError("reading tokenizer.model needs sentencepiece: pip install 'edgelmm[export]'") from None
        sp = spm.SentencePieceProcessor(model_file=str(sp_path))
        scores = []
        for i in range(sp.vocab_size()):
            tokens.append(sp.id_to_piece(i))
            scores.append(sp.get_score(i))
            types.append(gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                         else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.UNUSED if sp.is_unused(i)
                         else gguf.TokenType.NORMAL)
        for tid in sorted(added):
            while len(tokens) <= tid:  # added tokens beyond the sentencepiece model
                tokens.append(added[tid]["content"] if len(tokens) == tid else f"[PAD{len(tokens)}]")
                scores.append(-1000.0)
                types.append(gguf.TokenType.NORMAL if len(tokens) - 1 == tid else gguf.TokenType.UNUSED)
            if added[tid]["content"] == tokens[tid] and types[tid] == gguf.TokenType.NORMAL:
                types[tid] = gguf.TokenType.CONTROL if added[tid].get("special") else gguf.TokenType.USER_DEFINED
        while len(tokens) < vocab_size:
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
        kind, pre = "llama", "default"
        writer.add_add_space_prefix(_adds_space_prefix(tok_json))
    else:
        model = tok_json.get("model") or {}
        if model.get("type") != "BPE" or model.get("byte_fallback"):
            raise ExportError(f"{files.root}: tokenizer.json holds a {model.get('type')} model without a "
                              "tokenizer.model; GGUF needs a sentencepiece model or a byte-level BPE")
        pre = _byte_level_pre(tok_json)
        vocab = {**model["vocab"], **{t["content"]: i for i, t in added.items()}}
        by_id = {i: t for t, i in vocab.items()}
        for i in range(max(vocab_size, max(by_id) + 1)):
            if i in added:
                tokens.append(added[i]["content"])
                types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
            elif i in by_id:
                tokens.append(by_id[i])
                types.append(gguf.TokenType.NORMAL)
            else:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges(merges)
        kind = "gpt2"
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    ids = _special_ids(files)
    if ids["bos"] is not None:
        writer.add_bos_token_id(ids["bos"])
    eos = files.eos_token_ids
    if eos:  # generation_config's stop tokens: llama.cpp stops on both eos and eot
        writer.add_eos_token_id(eos[0])
        if len(eos) > 1:
            writer.add_eot_token_id(eos[1])
    if ids["unk"] is not None:
        writer.add_unk_token_id(ids["unk"])
    if ids["pad"] is not None:
        writer.add_pad_token_id(ids["pad"])
    writer.add_add_bos_token(_adds_bos(files))
    writer.add_add_eos_token(False)
    if files.chat_template:
        writer.add_chat_template(files.chat_template)
    return {"tokenizer": kind, "pre": pre, "tokens": len(tokens)}


# ---------------------------------------------------------------------------------------- LLM

def _rope_freqs(text: dict[str, Any], head_dim: int) -> np.ndarray | None:
    """Llama-3.1-style rope scaling as llama.cpp wants it: per-frequency factors (rope_freqs.weight)."""
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return None
    if kind != "llama3":
        raise ExportError(f"rope scaling {kind!r} is not written to GGUF here (default and llama3 are)")
    base = rope.get("rope_theta", text.get("rope_theta", 10000.0))
    factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def write_llm_gguf(family: Family, model, path: Path, wtype: str) -> dict[str, Any]:
    """The text model (embeddings, decoder layers, norm, lm_head) as a llama.cpp LLM GGUF of the
    family's text architecture (GGUFPlan.text_arch; its block table in gguf_names)."""
    import gguf

    arch = TEXT_ARCHES[family.gguf_plan().text_arch]
    parts = family.torch_parts(model)
    text_cfg = family.config.get("text_config") or family.config
    n_head, n_kv = text_cfg["num_attention_heads"], text_cfg.get("num_key_value_heads") or text_cfg["num_attention_heads"]
    hidden = text_cfg["hidden_size"]
    head_dim = text_cfg.get("head_dim") or hidden // n_head
    embed = _np(parts.embed_tokens.weight)
    vocab = embed.shape[0]
    rope = text_cfg.get("rope_parameters") or {}
    writer = gguf.GGUFWriter(str(path), arch.name)
    writer.add_name(Path(family.files.root).name)
    writer.add_context_length(int(text_cfg.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(text_cfg["num_hidden_layers"])
    writer.add_feed_forward_length(text_cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", text_cfg.get("rope_theta", 10000.0))))
    if arch.mrope:  # the rotary frequencies each position component (temporal, height, width) turns
        sections = list(rope.get("mrope_section") or (text_cfg.get("rope_scaling") or {}).get("mrope_section") or [])
        if not sections or len(sections) > 4:
            raise ExportError(f"the text config has no usable mrope_section ({sections}) for llama.cpp's {arch.name}")
        writer.add_rope_dimension_sections([int(x) for x in sections] + [0] * (4 - len(sections)))
    writer.add_layer_norm_rms_eps(float(text_cfg.get("rms_norm_eps", 1e-6)))
    if head_dim != hidden // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(vocab)
    writer.add_file_type(LLAMA_FTYPE[wtype])
    tok_info = write_tokenizer(writer, family.files, vocab)

    sink = _TensorSink(writer, wtype)
    sink.add("token_embd.weight", embed)
    freqs = _rope_freqs(text_cfg, head_dim)
    if freqs is not None:
        sink.add("rope_freqs.weight", freqs)
    transforms = _transforms(n_head, n_kv)
    for i, layer in enumerate(parts.decoder.layers):
        _write_rules(sink, arch.block, layer, transforms, i)
    sink.add("output_norm.weight", _np(parts.decoder.norm.weight))
    lm_head = _np(parts.lm_head.weight)
    if not np.array_equal(lm_head, embed):  # tied embeddings: llama.cpp reuses token_embd
        sink.add("output.weight", lm_head)
    _finish(writer)
    return tok_info


# ---------------------------------------------------------------------------------------- mmproj

def _vision_keys(writer, shape: ClipShape, norm, projection_dim: int, projector: str) -> None:
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(projector)
    writer.add_uint32("clip.vision.image_size", shape.image_size)
    writer.add_uint32("clip.vision.patch_size", shape.patch_size)
    writer.add_uint32("clip.vision.embedding_length", shape.width)
    writer.add_uint32("clip.vision.feed_forward_length", shape.ffn)
    writer.add_uint32("clip.vision.projection_dim", projection_dim)
    writer.add_uint32("clip.vision.attention.head_count", shape.heads)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", shape.eps)
    writer.add_uint32("clip.vision.block_count", shape.blocks)
    writer.add_array("clip.vision.image_mean", [float(m) for m in norm.mean])
    writer.add_array("clip.vision.image_std", [float(s) for s in norm.std])
    # ggml's GELU is the tanh approximation; neither flag set selects quick-GELU (CLIP's).
    writer.add_bool("clip.use_gelu", shape.activation == "gelu")
    if shape.activation == "silu":
        writer.add_bool("clip.use_silu", True)


def write_mmproj_gguf(family: Family, model, path: Path, wtype: str) -> dict[str, Any]:
    """The vision tower + projector as a llama.cpp mmproj ("clip") GGUF: the family's GGUFPlan
    says which tables (gguf_names) to walk over which modules."""
    import gguf

    plan = family.gguf_plan()
    if plan is None:
        raise ExportError(f"no mmproj writer for the {family.name} family")
    shape = plan.shape or ClipShape.from_vision_config(family.config["vision_config"])
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name(f"{Path(family.files.root).name} vision")
    writer.add_file_type(LLAMA_FTYPE[wtype])
    sink = _TensorSink(writer, wtype)
    tower = _attribute(model, plan.tower)
    tower = getattr(tower, "vision_model", tower)  # transformers 4 nests the transformer one level down
    text_hidden = (family.config.get("text_config") or {})["hidden_size"]
    _vision_keys(writer, shape, family.norm, text_hidden, plan.projector)
    for key, value in plan.keys:
        if isinstance(value, (list, tuple)):
            writer.add_array(key, list(value))
        else:
            writer.add_uint32(key, int(value))
    transforms = _transforms()
    _write_rules(sink, plan.tower_tensors, tower, transforms)
    for i, block in enumerate(list(_attribute(tower, plan.blocks))[:shape.blocks]):  # clip.cpp loads every block
        _write_rules(sink, plan.block_tensors, block, transforms, i)
    _write_rules(sink, plan.tensors, model, transforms)
    info = {"projector": plan.projector, **{key.rsplit(".", 1)[-1]: value for key, value in plan.keys}}
    _finish(writer)
    return info


def _attribute(obj, path: str, missing_ok: bool = False):
    for part in path.split("."):
        obj = getattr(obj, part, None) if missing_ok else getattr(obj, part)
        if obj is None:
            return None
    return obj


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------------------------------- k-quants

def quantize_with_llamacpp(src: Path, dst: Path, gguf_type: str, threads: int | None = None,
                           imatrix=None) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer (the only implementation of k-quants),
    weighting each column's rounding error by `imatrix` (export.imatrix.ImportanceMatrix) if given."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ExportError(f"{gguf_type} needs llama.cpp's quantizer: pip install 'edgelmm[llamacpp]' ({exc})") from None
    from ..runtimes.llamacpp import quiet_llamacpp

    quiet_llamacpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE[gguf_type]
    params.nthread = threads or default_threads() or 0
    keep_alive = None
    if imatrix is not None:
        keep_alive = imatrix.as_ctypes(llama_cpp)
        params.imatrix = keep_alive[0]
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    del keep_alive
    if rc != 0 or not dst.is_file():
        raise ExportError(f"llama.cpp's quantizer failed ({rc}) turning {src.name} into {gguf_type}")


# ---------------------------------------------------------------------------------------- entry

def export_gguf(family: Family, model, out_dir: Path, gguf_types, force: bool = False,
                progress: Callable[[str], Any] | None = None, imatrix=None,
                pending: list | None = None) -> list[dict[str, Any]]:
    """Write the LLM and mmproj GGUFs for each requested type under out_dir/gguf/ and return their
    artifact entries (graph "llm" / "mmproj", format "gguf", precision = the GGUF type). k-quants
    (q4_k_m) use `imatrix` (an ImportanceMatrix from the calibration prompts) when given.

    A k-quant is written as F16 first and quantized by llama.cpp from that file, which needs no
    PyTorch model: with a `pending` list the quantization is appended there for `finish_gguf` to
    run once the model is released (a 3B's fp32 model and its mapped F16 file: ~20 GB at once)."""
    from ..gguf_file import LLM, validate_gguf

    bad = [t for t in gguf_types if t not in GGUF_TYPES]
    if bad:
        raise ExportError(f"unknown GGUF type(s) {bad}; available: {', '.join(GGUF_TYPES)}")
    support = gguf_support(family)
    if not support.supported and not (force and support.forceable):
        raise ExportError(f"{family.files.root.name}: cannot export GGUF: {support.reason}")
    gdir = out_dir / "gguf"
    gdir.mkdir(parents=True, exist_ok=True)
    artifacts, written_mmproj = [], {}
    for gtype in gguf_types:
        if progress:
            progress(f"writing {gtype} GGUF (LLM + mmproj)")
        llm = out_dir / llm_file(gtype)
        if gtype == "q4_k_m":
            f16 = gdir / f".{gtype}.from.f16.gguf"  # inside the export's staging directory
            tok = write_llm_gguf(family, model, f16, "f16")
            job = PendingQuantization(f16, llm, gtype, imatrix)
            if pending is None:
                finish_gguf([job])
            else:
                pending.append(job)
        else:
            tok = write_llm_gguf(family, model, llm, gtype)
            validate_gguf(llm, LLM)
        mtype = MMPROJ_TYPE[gtype]
        mm = out_dir / mmproj_file(gtype)
        if mtype not in written_mmproj:
            written_mmproj[mtype] = write_mmproj_gguf(family, model, mm, mtype)
        validate_gguf(mm, "clip")
        common = {"format": "gguf", "precision": gtype, "inputs": [], "outputs": []}
        artifacts.append({**common, "graph": "llm", "file": llm_file(gtype), "files": [llm_file(gtype)],
                          "tokenizer": tok, **({"imatrix": imatrix.summary()}
                                               if imatrix is not None and gtype == "q4_k_m" else {})})
        artifacts.append({**common, "graph": "mmproj", "file": mmproj_file(gtype), "files": [mmproj_file(gtype)],
                          "mmproj_type": mtype, **written_mmproj[mtype],
                          **({"forced": support.reason} if not support.supported else {})})
    return artifacts


@dataclass
class PendingQuantization:
    source: Path       # the F16 GGUF written from the model
    target: Path       # the k-quant GGUF to write
    gguf_type: str
    imatrix: Any = None


def finish_gguf(pending: list[PendingQuantization], progress: Callable[[str], Any] | None = None) -> None:
    """Run llama.cpp's quantizer for each pending k-quant, file to file, removing the F16 source."""
    from ..gguf_file import LLM, validate_gguf

    for job in pending:
        if progress:
            progress(f"quantizing the LLM to {job.gguf_type}")
        try:
            quantize_with_llamacpp(job.source, job.target, job.gguf_type, imatrix=job.imatrix)
        finally:
            job.source.unlink(missing_ok=True)
        validate_gguf(job.target, LLM)
    pending.clear()
