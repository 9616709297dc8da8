"""Hostile GGUF files: every damage a bad-input campaign found (hangs in gguf-py, aborts and segfaults
in llama.cpp / mtmd, nonsense from NaN hyperparameters) is a GGUFError naming the key or tensor,
raised quickly by edgelmm.gguf_file before llama.cpp sees the file. The valid exported pair still
passes, parses exactly as gguf-py reads it, and still loads and answers in llama.cpp."""

import contextlib
import json
import math
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("gguf", reason="gguf-py is not installed")

from edgelmm.errors import GGUFError  # noqa: E402
from edgelmm.gguf_file import (ARRAY, INT32, STRING, UINT32, TokenEmbeddings, read_gguf,  # noqa: E402
                               validate_gguf)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(checkpoint, tmp_path_factory):
    """kind -> the exported bundle (LLM f32 + q8_0, mmproj f32 + q8_0), written once, not verified."""
    from edgelmm.export import export

    root, cache = tmp_path_factory.mktemp("hostile-gguf"), {}

    def get(kind):
        if kind not in cache:
            types = ["f32", "q8_0"] if kind == "llava-siglip" else ["f32"]
            cache[kind] = export(checkpoint(kind), root / kind, formats=["gguf"], gguf_types=types, verify=False,
                                 quiet=True)
        return cache[kind]

    return get


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging the suite) if the block runs longer than `seconds`."""
    def expire(*_):
        raise TimeoutError(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------ damaging files

def _element_offset(field, index: int) -> int:
    """Byte offset of element `index` of a string array (its 8-byte length field)."""
    pos = field.value_offset + 4 + 8
    for s in field.value[:index]:
        pos += 8 + len(s.encode("utf-8", "surrogateescape"))
    return pos


def patch(src, dst, edits):
    """Copy src to dst, overwriting bytes: edits = [(offset, bytes)]."""
    raw = bytearray(src.read_bytes())
    for offset, data in edits:
        raw[offset:offset + len(data)] = data
    dst.write_bytes(bytes(raw))
    return dst


def _pack_value(vtype, value, sub=None) -> bytes:
    if vtype == STRING:
        b = value.encode("utf-8", "surrogateescape")
        return struct.pack("<Q", len(b)) + b
    if vtype == ARRAY:
        return struct.pack("<iQ", sub, len(value)) + b"".join(_pack_value(sub, v) for v in value)
    fmt = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<b", 10: "<Q", 11: "<q", 12: "<d"}[vtype]
    return struct.pack(fmt, value)


def rewrite(src, dst, *, drop=(), kv=None, tensors=None):
    """Write a well-formed GGUF from src's KVs and tensors (exact value types kept) with changes:
    `drop` tensor names, `kv` {key: (type, value[, subtype]) or None to remove}, `tensors`
    {name: (type_id, dims, raw bytes)} replacing or adding tensors."""
    info = read_gguf(src)
    raw = src.read_bytes()
    kvs = {k: (f.type, f.value, f.subtype) for k, f in info.fields.items()}
    for k, v in (kv or {}).items():
        if v is None:
            kvs.pop(k, None)
        else:
            kvs[k] = (v[0], v[1], v[2] if len(v) > 2 else None)
    items = {t.name: (t.type_id, t.dims, raw[t.data_start:t.data_start + t.nbytes])
             for t in info.tensor_infos.values() if t.name not in drop}
    items.update(tensors or {})
    align = info.alignment
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(items), len(kvs)))
    for k, (vtype, value, sub) in kvs.items():
        out += _pack_value(STRING, k) + struct.pack("<i", vtype) + _pack_value(vtype, value, sub)
    offset, blobs = 0, []
    for name, (type_id, dims, data) in items.items():
        out += _pack_value(STRING, name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<iQ", type_id, offset)
        blobs.append(data + b"\0" * (-len(data) % align))
        offset += len(blobs[-1])
    out += b"\0" * (-len(out) % align)
    dst.write_bytes(bytes(out) + b"".join(blobs))
    return dst


def value_at(info, key, fmt, value):
    return [(info.fields[key].value_offset, struct.pack(fmt, value))]


def type_at(info, key, vtype):
    return [(info.fields[key].type_offset, struct.pack("<i", vtype))]


def tensor_field(info, name, what):
    """Offset of a tensor info's n_dims / type / offset field."""
    t = info.tensor_infos[name]
    pos = t.info_offset + 8 + len(name.encode())
    return {"n_dims": pos, "type": pos + 4 + 8 * len(t.dims), "offset": pos + 4 + 8 * len(t.dims) + 4}[what]


def duplicate_token(src, dst):
    info = read_gguf(src)
    f = info.fields["tokenizer.ggml.tokens"]
    by_len = {}
    for i, t in enumerate(f.value):
        j = by_len.setdefault(len(t.encode()), i)
        if j != i and i > 10:  # two same-length texts: make token i a copy of token j
            return patch(src, dst, [(_element_offset(f, i) + 8, f.value[j].encode())])
    raise AssertionError("no two tokens of the same length")


def lower_tensor_count(src, dst):
    info = read_gguf(src)
    return patch(src, dst, [(8, struct.pack("<Q", len(info.tensors) - 1))])


def changed_bias(src, dst, name):
    info = read_gguf(src)
    t = info.tensor_infos[name]
    data = src.read_bytes()[t.data_start:t.data_start + t.nbytes]
    return rewrite(src, dst, tensors={name: (t.type_id, (t.dims[0] - 4,), data[:-16])})


def overlap(src, dst):
    info = read_gguf(src)
    first, second = list(info.tensor_infos)[:2]
    return patch(src, dst, [(tensor_field(info, second, "offset"),
                             struct.pack("<Q", info.tensor_infos[first].offset))])


def beyond_eof(src, dst):
    info = read_gguf(src)
    last = list(info.tensor_infos)[-1]
    far = (info.size // info.alignment + 1) * info.alignment
    return patch(src, dst, [(tensor_field(info, last, "offset"), struct.pack("<Q", far))])


def norm_as_f16(src, dst):
    info = read_gguf(src)
    t = info.tensor_infos["blk.0.attn_norm.weight"]
    data = np.frombuffer(src.read_bytes()[t.data_start:t.data_start + t.nbytes], "<f4").astype("<f2").tobytes()
    return rewrite(src, dst, tensors={t.name: (1, t.dims, data)})


def extra_block(src, dst):
    info = read_gguf(src)
    n = info.metadata["llama.block_count"]
    t = info.tensor_infos["blk.0.attn_norm.weight"]
    return rewrite(src, dst, tensors={f"blk.{n}.attn_norm.weight":
                                      (t.type_id, t.dims, src.read_bytes()[t.data_start:t.data_start + t.nbytes])})


def edit(fn):
    """A damage that overwrites bytes: fn(info of the source) -> [(offset, bytes)]."""
    return lambda src, dst: patch(src, dst, fn(read_gguf(src)))


LLM = "gguf/model.f32.gguf"
MLP = "gguf/mmproj.f32.gguf"

# (id, bundle, file, damage(src, dst) -> dst, what the error must name)
CASES = [
    # gguf-py spun forever on these two; they must be refused at once
    ("scalar-type-becomes-array", "llava-siglip", LLM,
     edit(lambda i: type_at(i, "general.file_type", ARRAY)), r"general\.file_type"),
    ("array-of-arrays", "llava-siglip", LLM,
     edit(lambda i: [(i.fields["tokenizer.ggml.tokens"].value_offset, struct.pack("<i", ARRAY))]),
     r"tokenizer\.ggml\.tokens.*array of arrays"),
    ("array-length-2^62", "llava-siglip", LLM,
     edit(lambda i: [(i.fields["tokenizer.ggml.token_type"].value_offset + 4, struct.pack("<Q", 2 ** 62))]),
     r"tokenizer\.ggml\.token_type.*4611686018427387904 elements"),
    ("string-array-length-2^62", "llava-siglip", LLM,
     edit(lambda i: [(i.fields["tokenizer.ggml.tokens"].value_offset + 4, struct.pack("<Q", 2 ** 62))]),
     r"tokenizer\.ggml\.tokens.*4611686018427387904 elements"),
    ("string-length-2^62", "llava-siglip", LLM,
     edit(lambda i: [(i.fields["general.name"].value_offset, struct.pack("<Q", 2 ** 62))]), r"general\.name"),
    ("kv-count-2^63", "llava-siglip", LLM, edit(lambda i: [(16, struct.pack("<Q", 2 ** 63))]), r"KV pairs"),
    ("tensor-count-2^40", "llava-siglip", LLM, edit(lambda i: [(8, struct.pack("<Q", 2 ** 40))]), r"tensors"),
    # hyperparameters that abort llama.cpp or make it answer nonsense
    ("block-count-2^32-1", "llava-siglip", LLM,
     edit(lambda i: value_at(i, "llama.block_count", "<I", 2 ** 32 - 1)), r"llama\.block_count.*4294967295"),
    ("block-count-0", "llava-siglip", LLM, edit(lambda i: value_at(i, "llama.block_count", "<I", 0)),
     r"llama\.block_count"),
    ("block-count-lower", "llava-siglip", LLM, edit(lambda i: value_at(i, "llama.block_count", "<I", 1)),
     r"blk\.1\.attn_norm\.weight' belongs to block 1"),
    ("rms-eps-nan", "llava-siglip", LLM,
     edit(lambda i: value_at(i, "llama.attention.layer_norm_rms_epsilon", "<f", math.nan)),
     r"layer_norm_rms_epsilon.*nan"),
    ("rms-eps-negative", "llava-siglip", LLM,
     edit(lambda i: value_at(i, "llama.attention.layer_norm_rms_epsilon", "<f", -1e-5)), r"layer_norm_rms_epsilon"),
    ("freq-base-inf", "llava-siglip", LLM, edit(lambda i: value_at(i, "llama.rope.freq_base", "<f", math.inf)),
     r"llama\.rope\.freq_base.*inf"),
    ("u32-becomes-i32", "llava-siglip", LLM, edit(lambda i: type_at(i, "llama.context_length", INT32)),
     r"llama\.context_length' has type INT32, llama.cpp reads it as UINT32"),
    ("head-count-0", "llava-siglip", LLM, edit(lambda i: value_at(i, "llama.attention.head_count", "<I", 0)),
     r"llama\.attention\.head_count"),
    ("head-count-not-dividing", "llava-siglip", LLM,
     edit(lambda i: value_at(i, "llama.attention.head_count", "<I", 3)), r"head_count' = 3 does not divide"),
    ("head-count-kv-not-dividing", "llava-siglip", LLM,
     edit(lambda i: value_at(i, "llama.attention.head_count_kv", "<I", 3)), r"head_count_kv' = 3"),
    ("duplicate-token-text", "llava-siglip", LLM, duplicate_token, r"tokenizer\.ggml\.tokens.*same text"),
    ("eos-id-outside-vocab", "llava-siglip", LLM,
     edit(lambda i: value_at(i, "tokenizer.ggml.eos_token_id", "<I", 100000)), r"eos_token_id' = 100000"),
    ("unknown-llama-key", "llava-siglip", LLM,
     lambda s, d: rewrite(s, d, kv={"llama.expert_count": (UINT32, 8)}), r"unknown key 'llama\.expert_count'"),
    ("token-types-shorter", "llava-siglip", LLM,
     lambda s, d: rewrite(s, d, kv={"tokenizer.ggml.token_type": (ARRAY, [1] * 5, INT32)}),
     r"tokenizer\.ggml\.token_type' has 5 entries"),
    # tensors
    ("tensor-missing", "llava-siglip", LLM, lambda s, d: rewrite(s, d, drop=["blk.1.ffn_up.weight"]),
     r"blk\.1\.ffn_up\.weight' is missing"),
    ("tensor-extra-block", "llava-siglip", LLM, extra_block, r"blk\.2\.attn_norm\.weight' belongs to block 2"),
    ("norm-not-f32", "llava-siglip", LLM, norm_as_f16, r"blk\.0\.attn_norm\.weight' is F16; llama.cpp needs F32"),
    ("tensor-count-lower", "llava-siglip", LLM, lower_tensor_count, r"tensor count"),
    ("offset-beyond-eof", "llava-siglip", LLM, beyond_eof, r"output_norm\.weight|token_embd\.weight|offset"),
    ("tensors-overlap", "llava-siglip", LLM, overlap, r"overlaps tensor"),
    ("n-dims-5", "llava-siglip", LLM,
     edit(lambda i: [(tensor_field(i, "token_embd.weight", "n_dims"), struct.pack("<I", 5))]),
     r"token_embd\.weight' has 5 dimensions"),
    ("unknown-ggml-type", "llava-siglip", LLM,
     edit(lambda i: [(tensor_field(i, "token_embd.weight", "type"), struct.pack("<i", 4))]),
     r"token_embd\.weight' has ggml type 4"),
    # the mmproj (LLaVA MLP projector)
    ("clip-head-count-0", "llava-siglip", MLP,
     edit(lambda i: value_at(i, "clip.vision.attention.head_count", "<I", 0)), r"clip\.vision\.attention\.head_count"),
    ("clip-head-count-not-dividing", "llava-siglip", MLP,
     edit(lambda i: value_at(i, "clip.vision.attention.head_count", "<I", 3)), r"head_count' = 3 does not divide"),
    ("clip-patch-size-0", "llava-siglip", MLP, edit(lambda i: value_at(i, "clip.vision.patch_size", "<I", 0)),
     r"clip\.vision\.patch_size"),
    ("clip-patch-larger-than-image", "llava-siglip", MLP,
     edit(lambda i: value_at(i, "clip.vision.patch_size", "<I", 64)), r"patch_size' = 64 is larger than image_size"),
    ("clip-patch-size-changed", "llava-siglip", MLP, edit(lambda i: value_at(i, "clip.vision.patch_size", "<I", 7)),
     r"v\.patch_embd\.weight' has shape \[8, 8, 3, 32\], the metadata implies \[7, 7, 3, 32\]"),
    ("clip-eps-negative", "llava-siglip", MLP,
     edit(lambda i: value_at(i, "clip.vision.attention.layer_norm_epsilon", "<f", -1.0)), r"layer_norm_epsilon"),
    ("clip-image-mean-nan", "llava-siglip", MLP,
     edit(lambda i: [(i.fields["clip.vision.image_mean"].value_offset + 12 + 4, struct.pack("<f", math.nan))]),
     r"clip\.vision\.image_mean'\[1\] = nan"),
    ("clip-image-std-0", "llava-siglip", MLP,
     edit(lambda i: [(i.fields["clip.vision.image_std"].value_offset + 12, struct.pack("<f", 0.0))]),
     r"clip\.vision\.image_std'\[0\]"),
    ("clip-image-size-i32", "llava-siglip", MLP, edit(lambda i: type_at(i, "clip.vision.image_size", INT32)),
     r"clip\.vision\.image_size' has type INT32"),
    ("clip-feature-layer-out-of-range", "llava-siglip", MLP,
     edit(lambda i: [(i.fields["clip.vision.feature_layer"].value_offset + 12, struct.pack("<i", 99))]),
     r"clip\.vision\.feature_layer"),
    ("clip-no-vision-encoder", "llava-siglip", MLP,
     edit(lambda i: value_at(i, "clip.has_vision_encoder", "<b", 0)), r"clip\.has_vision_encoder"),
    ("clip-bool-byte-7", "llava-siglip", MLP,   # found by the fuzz campaign: llama.cpp took it as true
     edit(lambda i: value_at(i, "clip.has_vision_encoder", "<b", 7)), r"clip\.has_vision_encoder' is a BOOL byte of 7"),
    ("clip-tensor-count-lower", "llava-siglip", MLP, lower_tensor_count, r"tensor count \(54\)"),
    ("clip-mm0-bias-missing", "llava-siglip", MLP, lambda s, d: rewrite(s, d, drop=["mm.0.bias"]),
     r"mm\.0\.bias' is missing"),
    ("clip-bias-dim-changed", "llava-siglip", MLP, lambda s, d: changed_bias(s, d, "v.blk.0.attn_q.bias"),
     r"v\.blk\.0\.attn_q\.bias' has shape \[28\]"),
    ("clip-post-ln-added", "llava-siglip", MLP,
     lambda s, d: rewrite(s, d, tensors={"v.post_ln.weight": (0, (32,), b"\0" * 128)}), r"v\.post_ln\.weight"),
    ("clip-projector-type-an-array", "llava-siglip", MLP,
     lambda s, d: rewrite(s, d, kv={"clip.projector_type": (ARRAY, ["mlp"], STRING)}),
     r"clip\.projector_type' has type ARRAY\[STRING\], llama.cpp reads it as STRING"),
    # the Idefics3 projector
    ("idefics3-scale-1", "idefics3", MLP,
     edit(lambda i: value_at(i, "clip.vision.projector.scale_factor", "<I", 1)), r"scale_factor"),
    ("idefics3-scale-not-dividing", "idefics3", MLP,
     edit(lambda i: value_at(i, "clip.vision.projector.scale_factor", "<I", 3)), r"scale_factor' = 3 does not"),
    ("idefics3-no-preproc-size", "idefics3", MLP,
     lambda s, d: rewrite(s, d, kv={"clip.vision.preproc_image_size": None}), r"preproc_image_size' is missing"),
    ("idefics3-fc-missing", "idefics3", MLP, lambda s, d: rewrite(s, d, drop=["mm.model.fc.weight"]),
     r"mm\.model\.fc\.weight' is missing"),
    # Qwen2-VL's M-RoPE text model (ggml divides by the sum of the rope sections)
    ("qwen2vl-rope-sections-0", "qwen2vl", LLM,
     lambda s, d: rewrite(s, d, kv={"qwen2vl.rope.dimension_sections": (ARRAY, [0, 0, 0, 0], INT32)}),
     r"dimension_sections' = \[0, 0, 0, 0\] must add up to half the rotary dimension \(8\)"),
    ("qwen2vl-rope-sections-3", "qwen2vl", LLM,
     lambda s, d: rewrite(s, d, kv={"qwen2vl.rope.dimension_sections": (ARRAY, [2, 3, 3], INT32)}),
     r"dimension_sections' has 3 elements, expected 4"),
    ("qwen2vl-rope-sections-missing", "qwen2vl", LLM,
     lambda s, d: rewrite(s, d, kv={"qwen2vl.rope.dimension_sections": None}),
     r"qwen2vl\.rope\.dimension_sections' is missing"),
    ("qwen2vl-vocab-size-wrong", "qwen2vl", LLM,   # found by the fuzz campaign on a qwen2vl bundle
     edit(lambda i: value_at(i, "qwen2vl.vocab_size", "<I", 639)), r"qwen2vl\.vocab_size' = 639 but the vocabulary"),
    ("qwen2vl-unknown-key", "qwen2vl", LLM,
     lambda s, d: rewrite(s, d, kv={"qwen2vl.expert_count": (UINT32, 8)}), r"unknown key 'qwen2vl\.expert_count'"),
    ("qwen2vl-q-bias-dim-changed", "qwen2vl", LLM, lambda s, d: changed_bias(s, d, "blk.0.attn_q.bias"),
     r"blk\.0\.attn_q\.bias' has shape \[60\]"),
    # the qwen2vl_merger / qwen2.5vl_merger projectors
    ("qwen2vl-second-frame-kernel-missing", "qwen2vl", MLP,
     lambda s, d: rewrite(s, d, drop=["v.patch_embd.weight.1"]), r"v\.patch_embd\.weight\.1' is missing"),
    ("qwen2vl-merger-norm-bias-missing", "qwen2vl", MLP, lambda s, d: rewrite(s, d, drop=["v.post_ln.bias"]),
     r"v\.post_ln\.bias' is missing"),
    ("qwen2vl-merge-size-4", "qwen2vl", MLP,
     edit(lambda i: value_at(i, "clip.vision.spatial_merge_size", "<I", 4)), r"spatial_merge_size' = 4"),
    ("qwen2vl-ffn-as-wide-as-the-tower", "qwen2vl", MLP,
     edit(lambda i: value_at(i, "clip.vision.feed_forward_length", "<I", 32)), r"ffn_up and ffn_down swapped"),
    ("qwen2vl-vision-heads-2-wide", "qwen2vl", MLP,
     edit(lambda i: value_at(i, "clip.vision.attention.head_count", "<I", 16)), r"heads are 2 wide"),
    ("qwen2vl-taken-for-2.5", "qwen2vl", MLP,
     lambda s, d: rewrite(s, d, kv={"clip.projector_type": (STRING, "qwen2.5vl_merger")}),
     r"n_wa_pattern' is missing"),
    ("qwen2.5vl-no-window-pattern", "qwen2.5vl-w112", MLP,
     lambda s, d: rewrite(s, d, kv={"clip.vision.n_wa_pattern": None}), r"n_wa_pattern' is missing"),
    ("qwen2.5vl-window-pattern-0", "qwen2.5vl-w112", MLP,
     edit(lambda i: value_at(i, "clip.vision.n_wa_pattern", "<I", 0)), r"n_wa_pattern' = 0 is out of range"),
    ("qwen2.5vl-rmsnorm-gets-a-bias", "qwen2.5vl-w112", MLP,
     lambda s, d: rewrite(s, d, tensors={"v.blk.0.ln1.bias": (0, (32,), b"\0" * 128)}),
     r"unexpected tensor 'v\.blk\.0\.ln1\.bias'"),
    ("qwen2.5vl-gate-missing", "qwen2.5vl-w112", MLP, lambda s, d: rewrite(s, d, drop=["v.blk.1.ffn_gate.weight"]),
     r"v\.blk\.1\.ffn_gate\.weight' is missing"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_damaged_gguf_is_a_typed_error(pair, tmp_path, case):
    name, kind, rel, damage, expected = case
    src = pair(kind) / rel
    validate_gguf(src)  # the undamaged file passes
    bad = damage(src, tmp_path / f"{name}.gguf")
    with deadline(10), pytest.raises(GGUFError, match=expected) as err:
        validate_gguf(bad)
    assert str(bad) in str(err.value)


def test_truncated_anywhere_is_a_typed_error(pair, tmp_path):
    src = pair("llava-siglip") / LLM
    raw, info = src.read_bytes(), read_gguf(src)
    tokens = info.fields["tokenizer.ggml.tokens"]
    cuts = [0, 3, 10, 23, 30, tokens.value_offset + 100, info.data_offset - 1, info.data_offset + 100,
            len(raw) // 2, len(raw) - 1]
    for cut in cuts:
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(raw[:cut])
        with deadline(10), pytest.raises(GGUFError, match="truncated|bytes follow|tensor count"):
            validate_gguf(bad)


def test_exported_files_pass_and_parse_as_gguf_py_reads_them(pair):
    """Round trip: every KV (type and value) and every tensor (type, shape, data offset, size) equals
    what gguf-py's GGUFReader sees on the valid files."""
    import gguf

    files = [pair("llava-siglip") / f for f in (LLM, MLP, "gguf/model.q8_0.gguf", "gguf/mmproj.q8_0.gguf")]
    files += [pair("idefics3") / MLP, pair("qwen2vl") / LLM, pair("qwen2vl") / MLP, pair("qwen2.5vl-w112") / MLP]
    for path in files:
        info = validate_gguf(path)
        reader = gguf.GGUFReader(str(path))
        fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        assert set(fields) == set(info.fields)
        for key, f in fields.items():
            mine = info.fields[key]
            assert [mine.type] + ([mine.subtype] if mine.type == ARRAY else []) == [int(t) for t in f.types], key
            assert mine.value == f.contents(), key
        assert info.tensors == {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in reader.tensors}
        for t in reader.tensors:
            mine = info.tensor_infos[t.name]
            assert (mine.data_start, mine.nbytes) == (t.data_offset, t.n_bytes), t.name


def test_valid_pair_loads_in_llamacpp_and_answers(pair):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    import gguf

    import edgelmm
    from edgelmm.testing import sample_images

    path = pair("llava-siglip")
    assert validate_gguf(path / LLM, "llama").architecture == "llama"
    assert validate_gguf(path / MLP, "clip").metadata["clip.projector_type"] == "mlp"
    pipe = edgelmm.load(path, backend="llamacpp", precision="f32")
    out = pipe.generate("<image> What is it?", sample_images(1, seed=3), max_new_tokens=2)
    assert 1 <= len(out.token_ids) <= 2
    # The rows the backend feeds llama.cpp equal gguf-py's, for a float and a quantized table.
    for precision in ("f32", "q8_0"):
        file = path / f"gguf/model.{precision}.gguf"
        rows = TokenEmbeddings(read_gguf(file))
        ref = next(t for t in gguf.GGUFReader(str(file)).tensors if t.name == "token_embd.weight")
        ids = np.array([[0, 5, rows.vocab - 1]])
        want = np.asarray(ref.data[ids[0]]) if precision == "f32" else gguf.quants.dequantize(ref.data[ids[0]],
                                                                                              ref.tensor_type)
        assert rows.tensor.shape[-1] == rows.vocab and rows(ids).shape == (1, 3, rows.dim)
        np.testing.assert_array_equal(rows(ids)[0], want)


def _llama_8b_header(path, vocab=128256, merges=280000, d=4096, ff=14336, layers=32):
    """A Llama-3-8B-shaped Q4_K GGUF: the real header (128k tokens, 280k merges) and a sparse 5 GB
    data section (the file takes no disk space beyond its header)."""
    from edgelmm.gguf_file import FLOAT32, ggml_types

    ids = {name: i for i, (name, _, _) in ggml_types().items()}
    kvs = [("general.architecture", STRING, "llama"), ("llama.context_length", UINT32, 131072),
           ("llama.embedding_length", UINT32, d), ("llama.block_count", UINT32, layers),
           ("llama.feed_forward_length", UINT32, ff), ("llama.attention.head_count", UINT32, 32),
           ("llama.attention.head_count_kv", UINT32, 8), ("llama.rope.dimension_count", UINT32, 128),
           ("llama.rope.freq_base", FLOAT32, 500000.0), ("llama.attention.layer_norm_rms_epsilon", FLOAT32, 1e-5),
           ("tokenizer.ggml.model", STRING, "gpt2"), ("tokenizer.ggml.pre", STRING, "llama-bpe"),
           ("tokenizer.ggml.tokens", ARRAY, [f"t{i}" for i in range(vocab)], STRING),
           ("tokenizer.ggml.token_type", ARRAY, [1] * vocab, INT32),
           ("tokenizer.ggml.merges", ARRAY, [f"m{i} n{i}" for i in range(merges)], STRING),
           ("tokenizer.ggml.bos_token_id", UINT32, 1), ("tokenizer.ggml.add_bos_token", 7, True)]
    tensors = [("token_embd.weight", "Q4_K", (d, vocab)), ("output.weight", "Q6_K", (d, vocab)),
               ("output_norm.weight", "F32", (d,))]
    for i in range(layers):
        tensors += [(f"blk.{i}.attn_norm.weight", "F32", (d,)), (f"blk.{i}.ffn_norm.weight", "F32", (d,)),
                    (f"blk.{i}.attn_q.weight", "Q4_K", (d, d)), (f"blk.{i}.attn_k.weight", "Q4_K", (d, 1024)),
                    (f"blk.{i}.attn_v.weight", "Q6_K", (d, 1024)), (f"blk.{i}.attn_output.weight", "Q4_K", (d, d)),
                    (f"blk.{i}.ffn_gate.weight", "Q4_K", (d, ff)), (f"blk.{i}.ffn_up.weight", "Q4_K", (d, ff)),
                    (f"blk.{i}.ffn_down.weight", "Q6_K", (ff, d))]
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)))
    for key, vtype, value, *sub in kvs:
        out += _pack_value(STRING, key) + struct.pack("<i", vtype) + _pack_value(vtype, value, *sub)
    offset = 0
    for name, type_name, dims in tensors:
        _, block, size = ggml_types()[ids[type_name]]
        out += _pack_value(STRING, name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", x) for x in dims)
        out += struct.pack("<iQ", ids[type_name], offset)
        offset += -(-(math.prod(dims) // block * size) // 32) * 32
    out += b"\0" * (-len(out) % 32)
    with open(path, "wb") as fh:
        fh.write(out)
        fh.truncate(len(out) + offset)
    return path


def test_multi_gigabyte_model_is_checked_fast_in_little_memory(tmp_path):
    """The header is walked on an mmap and the data never read: a 5 GB Llama-3-8B-shaped file
    (128k tokens, 280k merges) validates in about a second of CPU time, in tens of MB."""
    path = _llama_8b_header(tmp_path / "8b.gguf")
    assert path.stat().st_size > 5e9
    code = f"""
import json, resource, time
import numpy as np
from edgelmm.gguf_file import TokenEmbeddings, validate_gguf
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.process_time()   # CPU seconds: a busy machine stretches the wall clock, not this
info = validate_gguf({str(path)!r}, "llama")
rows = TokenEmbeddings(info)(np.array([1, 128255]))
print(json.dumps({{"s": time.process_time() - start, "mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
                  "shape": list(rows.shape)}}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                    check=True).stdout)
    assert out["shape"] == [2, 4096]
    assert out["mb"] < 200 and out["s"] < 20, out
