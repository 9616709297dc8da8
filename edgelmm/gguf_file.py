"""Reading and validating GGUF files before llama.cpp sees them.

llama.cpp trusts much of a GGUF file: some damaged files abort the process (GGML_ASSERT), segfault
inside mtmd, or load and answer nonsense, and gguf-py's GGUFReader spins forever on some headers.
So edgelmm parses the header itself and checks what llama.cpp (src/llama-model*.cpp,
src/llama-vocab.cpp, tools/mtmd/clip.cpp) will read for the architectures edgelmm writes
(export/gguf.py): the LLM's text architectures ("llama", "qwen2vl": gguf_names.TEXT_ARCHES) and
"clip" (the mmproj, projector "mlp", "idefics3", "qwen2vl_merger" or "qwen2.5vl_merger").
Needs only numpy and gguf-py's ggml type table; the file is mmap'ed, never read whole.

read_gguf(path) -- the container, every count and length checked against the bytes left before any
loop or allocation it drives:
  - magic "GGUF", version 2 or 3, tensor and KV counts that the remaining bytes could hold;
  - each KV: non-empty unique key, a known value type, strings <= 16 MiB, arrays of a scalar or
    string type (no nested arrays) with at most 2^21 elements that fit in the bytes left, and all
    values together no more than ~256 MiB once in memory;
  - general.alignment (UINT32, a power of two; default 32);
  - each tensor info: unique name < 64 bytes, n_dims <= 4, dims >= 0 with a product < 2^63, a ggml
    type llama.cpp knows, rows a whole number of blocks; data offsets aligned, in header order,
    without overlap or gap (what gguf.cpp demands), every tensor inside the file, and no more than
    an alignment's worth of bytes after the last one (a wrong tensor count in the header).
validate_gguf(path, architecture) -- read_gguf plus, for each architecture (tables below):
  - every key llama.cpp requires present, every key edgelmm/llama.cpp know with the exact GGUF type
    llama.cpp reads it as (a wrong type aborts in gguf.cpp), numbers in range and floats finite;
    unknown keys in the llama.* (qwen2vl.*) / tokenizer.* / clip.* namespaces refused (llama.cpp
    would act on some of them, e.g. llama.expert_count);
  - text: head counts dividing the width, head_count_kv dividing head_count, rope dimension = head
    size (M-RoPE: four sections adding up to half of it), key and value lengths equal, block_count
    1..512 (LLAMA_MAX_LAYERS) and equal to the blk.N tensors present; the vocabulary: unique token
    texts (llama-vocab asserts it), scores/types of the same length, known token types, byte
    tokens spelled <0xXX> (and all 256 of them for a sentencepiece vocab), special token ids
    inside the vocabulary, a BOS id whenever BOS is added;
  - clip: has_vision_encoder, head_count dividing the width (0 divides nothing), 1 <= patch_size
    <= image_size <= 8192 (the grid is image_size // patch_size a side, as in HF and clip.cpp),
    image_mean/std of 3 finite values (std > 0), distinct feature_layer indices in 0..block_count,
    the idefics3 scale factor (>= 2, dividing the patch grid) and preprocessing size (mtmd asserts
    both), the Qwen projectors' merge size (2), window pattern (Qwen2.5-VL) and head width (a multiple
    of 4), and no MLP as wide as the tower (clip.cpp would take it for a legacy swapped file);
  - tensors: exactly the set llama.cpp looks up for that configuration (every v.blk.N bias, mm.0/mm.2
    weight and bias, post_ln, ...; no stray or missing one: clip.cpp loads most tensors as optional
    and then dereferences them), each with the exact shape its metadata implies, and a type llama.cpp
    can use there (1-D norms/biases F32, matrices a float or weight-quantization type, the conv kernel
    and position embeddings F32/F16).
Problems are collected and reported together (the first few) in one GGUFError naming the file and
the key or tensor.

GGUFInfo also records where every KV and tensor info sits in the file (GGUFField.type_offset /
value_offset, GGUFTensor.info_offset), so a fuzzer can damage one field precisely. TokenEmbeddings
reads token_embd.weight rows through a memmap (no whole-table copy).
"""

from __future__ import annotations

import functools
import math
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GGUFError
from .gguf_names import TEXT_ARCHES

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Container limits: far above any real model (vocab 256k, merges ~500k, ~1k tensors, ~50 keys), far
# below what a hostile header could ask for.
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 20
MAX_ARRAY = 1 << 21
MAX_STRING = 1 << 24
MAX_METADATA_COST = 1 << 28   # bytes of Python objects the KVs may become (~64 per string, 32 per number)
MAX_NAME = 63          # GGML_MAX_NAME (64) with its terminating NUL
MAX_DIMS = 4           # GGML_MAX_DIMS
MAX_PROBLEMS = 5       # reported in one error

# GGUF value types (gguf.h)
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
TYPE_NAMES = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING", "ARRAY",
              "UINT64", "INT64", "FLOAT64")
_SCALAR = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
           BOOL: "<b", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
_NUMPY = {UINT8: "<u1", INT8: "<i1", UINT16: "<u2", INT16: "<i2", UINT32: "<u4", INT32: "<i4", FLOAT32: "<f4",
          BOOL: "<i1", UINT64: "<u8", INT64: "<i8", FLOAT64: "<f8"}
_FLOATS = (FLOAT32, FLOAT64)

# ggml type ids that llama.cpp's GGML_TYPE enum defines today (4, 5, 31-33, 36-38 were removed).
_LLAMA_CPP_TYPE_IDS = frozenset(range(43)) - {4, 5, 31, 32, 33, 36, 37, 38}
# Where each kind of tensor may use which type.
NORM_TYPES = frozenset({"F32"})                      # 1-D: norms, biases, rope factors (always F32)
SMALL_TYPES = frozenset({"F32", "F16"})              # conv kernel (im2col), position embeddings
MATRIX_TYPES = frozenset({"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
                          "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S",
                          "IQ4_XS", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4"})  # weight types ggml multiplies


@functools.cache
def ggml_types() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, block size, bytes per block), from gguf-py's table."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType
            if int(t) in _LLAMA_CPP_TYPE_IDS and t in GGML_QUANT_SIZES}


# ------------------------------------------------------------------------------------ the container

@dataclass
class GGUFField:
    """One KV: its value type (and element type for arrays), value, and where it sits in the file
    (offset of the key, of the value-type field, of the value) -- for tools that patch headers."""
    type: int
    subtype: int | None
    value: Any
    offset: int
    type_offset: int
    value_offset: int

    @property
    def type_name(self) -> str:
        return _type_name(self.type, self.subtype)


@dataclass
class GGUFTensor:
    name: str
    type_id: int
    type_name: str
    dims: tuple[int, ...]      # ggml order: ne0 first
    offset: int                # relative to the data section, as stored
    data_start: int            # absolute byte offset in the file
    nbytes: int
    info_offset: int           # where its tensor info (name length) starts


@dataclass
class GGUFInfo:
    path: Path
    architecture: str
    version: int
    metadata: dict[str, Any]                              # key -> value (arrays as lists)
    tensors: dict[str, tuple[str, tuple[int, ...]]]       # name -> (type name, ggml dims: ne0 first)
    fields: dict[str, GGUFField] = field(default_factory=dict, repr=False)
    tensor_infos: dict[str, GGUFTensor] = field(default_factory=dict, repr=False)
    alignment: int = DEFAULT_ALIGNMENT
    data_offset: int = 0
    size: int = 0


def _type_name(vtype: int, subtype: int | None = None) -> str:
    name = TYPE_NAMES[vtype] if 0 <= vtype < len(TYPE_NAMES) else f"type {vtype}"
    return f"{name}[{_type_name(subtype)}]" if vtype == ARRAY and subtype is not None else name


class _Header:
    """Bounds-checked reads from the mmap'ed file: nothing is read or looped over before the bytes
    it needs are known to be there."""

    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0
        self.cost = 0   # memory the parsed values will take, bounded by MAX_METADATA_COST
        self.context = ""  # where the walk is, for messages about values that ran wild

    def spend(self, n: int, what: str) -> None:
        self.cost += n
        if self.cost > MAX_METADATA_COST:
            self.fail(f"{what}: the metadata would take more than {MAX_METADATA_COST >> 20} MiB of memory")

    def fail(self, message: str):
        raise GGUFError(message + self.context, path=str(self.path))

    @property
    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> int:
        if n > self.left:
            self.fail(f"{what} needs {n} bytes at offset {self.pos} but only {self.left} remain "
                      "(the file is truncated or corrupt)")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, vtype: int, what: str):
        fmt = _SCALAR[vtype]
        start = self.take(struct.calcsize(fmt), what)
        value = struct.unpack_from(fmt, self.buf, start)[0]
        if vtype == BOOL:
            if value not in (0, 1):  # a C++ bool read from any other byte is undefined behaviour
                self.fail(f"{what} is a BOOL byte of {value}, not 0 or 1")
            return bool(value)
        return value

    def string(self, what: str, limit: int = MAX_STRING) -> str:
        n = self.scalar(UINT64, f"{what} (length)")
        if n > limit:
            self.fail(f"{what} has length {n}, more than the limit {limit}")
        start = self.take(n, what)
        self.spend(64 + n, what)
        # surrogateescape: lossless for invalid UTF-8, so distinct byte strings stay distinct
        return bytes(self.buf[start:start + n]).decode("utf-8", "surrogateescape")

    def strings(self, n: int, what: str) -> list[str]:
        """n strings (a token list: up to a few 100k), with the checks of string() inlined."""
        buf, size, pos, out = self.buf, self.size, self.pos, []
        unpack = struct.Struct("<Q").unpack_from
        for i in range(n):
            length = unpack(buf, pos)[0] if pos + 8 <= size else None
            if length is None or length > MAX_STRING or length > size - pos - 8:
                self.pos = pos
                return [self.string(f"{what}[{i}]")]  # raises with the precise message
            self.cost += 64 + length
            if self.cost > MAX_METADATA_COST:
                self.spend(0, f"{what}[{i}]")
            out.append(bytes(buf[pos + 8:pos + 8 + length]).decode("utf-8", "surrogateescape"))
            pos += 8 + length
        self.pos = pos
        return out

    def value(self, vtype: int, what: str) -> tuple[Any, int | None]:
        if vtype == STRING:
            return self.string(what), None
        if vtype in _SCALAR:
            return self.scalar(vtype, what), None
        if vtype != ARRAY:
            self.fail(f"{what} has value type {vtype}, not a GGUF type")
        sub = self.scalar(INT32, f"{what} (array element type)")
        n = self.scalar(UINT64, f"{what} (array length)")
        if sub == ARRAY:
            self.fail(f"{what} is an array of arrays, which llama.cpp does not read")
        if sub != STRING and sub not in _SCALAR:
            self.fail(f"{what} is an array of value type {sub}, not a GGUF type")
        if n > MAX_ARRAY:
            self.fail(f"{what} has {n} elements, more than the limit {MAX_ARRAY}")
        if sub == STRING:
            # every element needs at least its 8-byte length: check the whole array's minimum first
            if n * 8 > self.left:
                self.fail(f"{what} claims {n} strings, more than the {self.left} bytes left could hold "
                          "(the file is truncated or corrupt)")
            return self.strings(n, what), sub
        itemsize = struct.calcsize(_SCALAR[sub])
        self.spend(32 * n, what)
        start = self.take(n * itemsize, f"{what} ({n} x {TYPE_NAMES[sub]})")
        values = np.frombuffer(bytes(self.buf[start:start + n * itemsize]), dtype=_NUMPY[sub])
        if sub == BOOL:
            if ((values != 0) & (values != 1)).any():
                self.fail(f"{what} holds a BOOL byte that is neither 0 nor 1")
            values = values != 0
        return values.tolist(), sub


def _parse(buf, size: int, path: Path) -> GGUFInfo:
    h = _Header(buf, size, path)
    start = h.take(4, "the magic")
    magic = bytes(buf[start:start + 4])
    if magic != GGUF_MAGIC:
        h.fail(f"wrong magic {magic!r} (a GGUF file starts with {GGUF_MAGIC!r})")
    version = h.scalar(UINT32, "the version")
    if version not in SUPPORTED_VERSIONS:
        h.fail(f"GGUF version {version} is not one llama.cpp reads {SUPPORTED_VERSIONS} "
               "(or the file is big-endian)")
    n_tensors = h.scalar(UINT64, "the tensor count")
    n_kv = h.scalar(UINT64, "the KV count")
    # The smallest KV: key length + 1 byte of key + value type + 1-byte value (14 bytes); the smallest
    # tensor info: name length + 1 byte of name + n_dims + type + offset (25 bytes).
    if n_kv > min(MAX_KV, h.left // 14):
        h.fail(f"the header claims {n_kv} KV pairs; the {h.left} bytes left could hold at most "
               f"{h.left // 14} (limit {MAX_KV}): the file is truncated or corrupt")
    if n_tensors > min(MAX_TENSORS, h.left // 25):
        h.fail(f"the header claims {n_tensors} tensors; the {h.left} bytes left could hold at most "
               f"{h.left // 25} (limit {MAX_TENSORS}): the file is truncated or corrupt")

    fields: dict[str, GGUFField] = {}
    prev = ""
    for i in range(n_kv):
        offset = h.pos
        if prev:  # a damaged value type or length shows up as garbage in the KVs after it
            h.context = f" (in KV {i}, after key {prev!r} ({fields[prev].type_name}))"
        key = h.string(f"key {i}", limit=1 << 16)
        if not key:
            h.fail(f"key {i} (offset {offset}) is empty")
        if key in fields:
            h.fail(f"key {key!r} appears twice")
        type_offset = h.pos
        vtype = h.scalar(INT32, f"the value type of key {key!r}")
        value, sub = h.value(vtype, f"key {key!r}")
        fields[key] = GGUFField(vtype, sub, value, offset, type_offset, type_offset + 4)
        prev = key

    h.context = ""
    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in fields:
        f = fields["general.alignment"]
        if f.type != UINT32:
            h.fail(f"key 'general.alignment' has type {f.type_name}, llama.cpp needs UINT32")
        alignment = f.value
        if alignment == 0 or alignment & (alignment - 1):
            h.fail(f"general.alignment = {alignment} is not a power of two")

    types = ggml_types()
    infos: list[GGUFTensor] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        info_offset = h.pos
        h.context = f" (in tensor info {i}" + (f", after tensor {infos[-1].name!r})" if infos else ")")
        name = h.string(f"the name of tensor {i}", limit=1 << 16)
        if not name or len(name.encode("utf-8", "surrogateescape")) > MAX_NAME:
            h.fail(f"tensor {i} has a name of {len(name)} characters {name[:80]!r} (1..{MAX_NAME} bytes)")
        if name in seen:
            h.fail(f"tensor {name!r} appears twice")
        seen.add(name)
        n_dims = h.scalar(UINT32, f"the dimension count of tensor {name!r}")
        if n_dims > MAX_DIMS:
            h.fail(f"tensor {name!r} has {n_dims} dimensions (ggml has at most {MAX_DIMS})")
        dims = tuple(h.scalar(UINT64, f"dimension {j} of tensor {name!r}") for j in range(n_dims))
        n_elements = math.prod(dims)
        if any(d >= 1 << 63 for d in dims) or n_elements >= 1 << 63:
            h.fail(f"tensor {name!r} has dimensions {list(dims)}, too large for ggml (int64)")
        type_id = h.scalar(INT32, f"the type of tensor {name!r}")
        if type_id not in types:
            h.fail(f"tensor {name!r} has ggml type {type_id}, not one llama.cpp knows")
        type_name, block, type_size = types[type_id]
        if dims and dims[0] % block:
            h.fail(f"tensor {name!r} ({type_name}) has rows of {dims[0]} elements, not a multiple of its "
                   f"block size {block}")
        offset = h.scalar(UINT64, f"the data offset of tensor {name!r}")
        infos.append(GGUFTensor(name, type_id, type_name, dims, offset, 0, n_elements // block * type_size,
                                info_offset))

    h.context = ""
    data_offset = -(-h.pos // alignment) * alignment
    if infos and data_offset > size:
        h.fail(f"the tensor data would start at byte {data_offset} but the file has {size} (truncated)")
    expected = 0  # gguf.cpp: each tensor starts where the previous one (padded to the alignment) ends
    for before, t in zip([None] + infos[:-1], infos):
        t.data_start = data_offset + t.offset
        if t.offset % alignment:
            h.fail(f"tensor {t.name!r} has data offset {t.offset}, not a multiple of the alignment {alignment}")
        if t.data_start + t.nbytes > size:
            h.fail(f"tensor {t.name!r} ends at byte {t.data_start + t.nbytes} but the file has {size} "
                   "(truncated, or its offset points past the end)")
        if t.offset < expected:
            h.fail(f"tensor {t.name!r} (data offset {t.offset}) overlaps tensor {before.name!r} "
                   f"(data bytes {before.offset}..{before.offset + before.nbytes})")
        if t.offset > expected:
            h.fail(f"tensor {t.name!r} has data offset {t.offset}, expected {expected} (tensors follow each "
                   "other in header order; the offsets or the tensor count are corrupt)")
        expected = t.offset + -(-t.nbytes // alignment) * alignment
    if infos and size - (data_offset + expected) >= alignment:
        h.fail(f"{size - data_offset - expected} bytes follow the last tensor's data: the header's tensor "
               f"count ({n_tensors}) does not describe the file")

    arch = fields.get("general.architecture")
    if arch is None or arch.type != STRING:
        h.fail("no general.architecture key" if arch is None
               else f"key 'general.architecture' has type {arch.type_name}, llama.cpp needs STRING")
    return GGUFInfo(path=path, architecture=arch.value, version=version,
                    metadata={k: f.value for k, f in fields.items()},
                    tensors={t.name: (t.type_name, t.dims) for t in infos},
                    fields=fields, tensor_infos={t.name: t for t in infos},
                    alignment=alignment, data_offset=data_offset, size=size)


def read_gguf(path: str | Path) -> GGUFInfo:
    """Parse a GGUF file's header (mmap'ed, bounds-checked), raising GGUFError (naming the file)
    for anything malformed: see the module docstring."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError("missing", path=str(path))
    size = path.stat().st_size
    if size < 24:
        with open(path, "rb") as fh:
            head = fh.read(4)
        if len(head) == 4 and head != GGUF_MAGIC:
            raise GGUFError(f"wrong magic {head!r} (a GGUF file starts with {GGUF_MAGIC!r})", path=str(path))
        raise GGUFError(f"only {size} bytes: not a GGUF file (truncated)", path=str(path))
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _parse(buf, size, path)


# ------------------------------------------------------------------------------------ what llama.cpp reads

@dataclass(frozen=True)
class Key:
    """What a key must be: GGUF type (element type for arrays), presence, bounds (inclusive lo/hi,
    `above` exclusive; floats also finite), allowed values, array length."""
    type: int
    required: bool = False
    lo: float | None = None
    hi: float | None = None
    above: float | None = None
    sub: int | None = None
    choices: tuple = ()
    length: tuple[int, int] | None = None


MAX_CONTEXT = 1 << 20        # llama.context_length (Llama 3.1: 131072); the backend sizes its cache from it
MAX_WIDTH = 1 << 16
MAX_VOCAB = 1 << 21
ID = Key(UINT32, lo=0, hi=MAX_VOCAB)

GENERAL_KEYS = {
    "general.architecture": Key(STRING, True),
    "general.alignment": Key(UINT32, lo=1, hi=1 << 16),
    "general.name": Key(STRING),
    "general.description": Key(STRING),
    "general.file_type": Key(UINT32, lo=0, hi=1 << 16),
    "general.quantization_version": Key(UINT32),
    # one-file models only: llama.cpp would go looking for the other splits
    "split.count": Key(UINT16, lo=1, hi=1),
    "split.no": Key(UINT16, lo=0, hi=0),
    "split.tensors.count": Key(INT32),
}

# Required: what llama.cpp needs, and what edgelmm always writes where a missing key would silently
# change the model (llama.cpp falls back to defaults: rope base 10000, quick-GELU, no GQA, ...).
# The same keys under each text architecture's prefix (gguf_names.TEXT_ARCHES: llama., qwen2vl.).
_TEXT_KEYS = {
    "context_length": Key(UINT32, True, 16, MAX_CONTEXT),  # below 16 llama.cpp asserts (batch < sequences)
    "embedding_length": Key(UINT32, True, 1, MAX_WIDTH),
    "block_count": Key(UINT32, True, 1, 512),            # LLAMA_MAX_LAYERS, GGML_ASSERTed
    "feed_forward_length": Key(UINT32, True, 1, 1 << 20),
    "attention.head_count": Key(UINT32, True, 1, 4096),
    "attention.head_count_kv": Key(UINT32, True, 1, 4096),
    "attention.key_length": Key(UINT32, False, 1, 4096),
    "attention.value_length": Key(UINT32, False, 1, 4096),
    "attention.layer_norm_rms_epsilon": Key(FLOAT32, True, above=0.0, hi=1.0),
    "rope.dimension_count": Key(UINT32, True, 2, 4096),
    "rope.freq_base": Key(FLOAT32, True, above=0.0, hi=1e12),  # absent: 10000
    "rope.scaling.type": Key(STRING, choices=("none", "linear", "yarn")),  # others GGML_ASSERT
    "rope.scaling.factor": Key(FLOAT32, lo=0.0, hi=1e6),
    "rope.scale_linear": Key(FLOAT32, lo=0.0, hi=1e6),
    "rope.scaling.attn_factor": Key(FLOAT32, above=0.0, hi=1e6),
    "rope.scaling.original_context_length": Key(UINT32, lo=1, hi=MAX_CONTEXT),
    "rope.scaling.finetuned": Key(BOOL),
    "vocab_size": Key(UINT32, lo=1, hi=MAX_VOCAB),
}
# M-RoPE: how many of a head's rotary frequencies follow the temporal, height, width (and a fourth,
# unused) position component; ggml takes the frequency index modulo their sum (0 divides nothing).
_MROPE_KEYS = {"rope.dimension_sections": Key(ARRAY, True, sub=INT32, lo=0, hi=4096, length=(4, 4))}
TEXT_KEYS = {arch.name: {f"{arch.name}.{k}": spec
                         for k, spec in {**_TEXT_KEYS, **(_MROPE_KEYS if arch.mrope else {})}.items()}
             for arch in TEXT_ARCHES.values()}

TOKENIZER_KEYS = {
    "tokenizer.ggml.model": Key(STRING, True, choices=("llama", "gpt2")),
    "tokenizer.ggml.pre": Key(STRING, True, choices=("default", "gpt-2", "llama-bpe", "llama3", "smollm",
                                                       "qwen2")),
    "tokenizer.ggml.tokens": Key(ARRAY, True, sub=STRING, length=(1, MAX_VOCAB)),
    "tokenizer.ggml.scores": Key(ARRAY, sub=FLOAT32, length=(1, MAX_VOCAB)),
    "tokenizer.ggml.token_type": Key(ARRAY, sub=INT32, lo=0, hi=6, length=(1, MAX_VOCAB)),  # llama_token_type
    "tokenizer.ggml.merges": Key(ARRAY, sub=STRING, length=(0, MAX_ARRAY)),
    "tokenizer.ggml.token_type_count": Key(UINT32),
    **{f"tokenizer.ggml.{name}_token_id": ID for name in ("bos", "eos", "eot", "eom", "unknown", "seperator",
                                                           "padding", "cls", "mask", "fim_pre", "fim_suf", "fim_mid",
                                                           "fim_pad", "fim_rep", "fim_sep", "prefix", "suffix",
                                                           "middle")},  # (sic) "seperator": llama-arch.cpp
    **{f"tokenizer.ggml.{name}": Key(BOOL) for name in ("add_eos_token", "add_sep_token", "add_space_prefix",
                                                        "remove_extra_whitespaces")},
    "tokenizer.ggml.add_bos_token": Key(BOOL, True),   # absent: a default that depends on the vocab type
    "tokenizer.chat_template": Key(STRING),
}

CLIP_KEYS = {
    "clip.has_vision_encoder": Key(BOOL, True, choices=(True,)),
    "clip.has_audio_encoder": Key(BOOL, choices=(False,)),
    "clip.has_gen_audio_encoder": Key(BOOL, choices=(False,)),
    "clip.projector_type": Key(STRING, True, choices=("mlp", "idefics3", "qwen2vl_merger", "qwen2.5vl_merger")),
    "clip.use_gelu": Key(BOOL, True),   # absent: quick-GELU
    "clip.use_silu": Key(BOOL),
    "clip.vision.image_size": Key(UINT32, True, 1, 8192),          # clip.cpp's own cap
    "clip.vision.patch_size": Key(UINT32, True, 1, 65535),
    "clip.vision.embedding_length": Key(UINT32, True, 1, MAX_WIDTH),
    "clip.vision.feed_forward_length": Key(UINT32, True, 1, 1 << 20),
    "clip.vision.projection_dim": Key(UINT32, True, 1, MAX_WIDTH),
    "clip.vision.block_count": Key(UINT32, True, 1, 512),
    "clip.vision.attention.head_count": Key(UINT32, True, 1, 4096),
    "clip.vision.attention.head_count_kv": Key(UINT32, False, 1, 4096),
    "clip.vision.attention.head_dim": Key(UINT32, False, 1, 4096),
    "clip.vision.attention.layer_norm_epsilon": Key(FLOAT32, True, above=0.0, hi=1.0),
    "clip.vision.image_mean": Key(ARRAY, True, sub=FLOAT32, lo=-1e3, hi=1e3, length=(3, 3)),
    "clip.vision.image_std": Key(ARRAY, True, sub=FLOAT32, above=0.0, hi=1e3, length=(3, 3)),
}
PROJECTOR_KEYS = {
    "mlp": {"clip.vision.feature_layer": Key(ARRAY, True, sub=INT32, lo=0, hi=512, length=(1, 64))},
    "idefics3": {"clip.vision.projector.scale_factor": Key(UINT32, True, 2, 64),   # pixel shuffle asserts > 1
                 "clip.vision.preproc_image_size": Key(UINT32, True, 1, 16384)},  # mtmd divides by it
    # clip.cpp's Qwen graphs reshape by 2x2 patches whatever the key says
    "qwen2vl_merger": {"clip.vision.spatial_merge_size": Key(UINT32, True, 2, 2)},
    # n_wa_pattern: every n-th layer attends over the whole image, the others within windows
    "qwen2.5vl_merger": {"clip.vision.spatial_merge_size": Key(UINT32, True, 2, 2),
                         "clip.vision.n_wa_pattern": Key(UINT32, True, 1, 512)},
}

# Namespaces llama.cpp interprets: a key there that is not in the tables is refused.
STRICT_PREFIXES = {**{arch: (f"{arch}.", "tokenizer.", "split.") for arch in TEXT_ARCHES}, "clip": ("clip.", "split.")}
NAMED_TEMPLATE = "tokenizer.chat_template."   # tokenizer.chat_template.<name>: strings
LLM = "llm"   # validate_gguf: an LLM GGUF of any text architecture
QWEN_PROJECTORS = ("qwen2vl_merger", "qwen2.5vl_merger")
# clip.cpp swaps ffn_up/ffn_down of these when the down projection's input is as wide as the model
SWAPPED_FFN_PROJECTORS = ("mlp", "idefics3", *QWEN_PROJECTORS)


def _check_key(name: str, f: GGUFField, spec: Key, problems: list[str]) -> bool:
    if f.type != spec.type or (spec.type == ARRAY and f.subtype != spec.sub):
        problems.append(f"key {name!r} has type {f.type_name}, llama.cpp reads it as {_type_name(spec.type, spec.sub)}")
        return False
    values = f.value if spec.type == ARRAY else [f.value]
    if spec.length and not spec.length[0] <= len(values) <= spec.length[1]:
        lo, hi = spec.length
        problems.append(f"key {name!r} has {len(values)} elements, expected {lo if lo == hi else f'{lo}..{hi}'}")
        return False
    if spec.choices and f.value not in spec.choices:
        problems.append(f"key {name!r} = {f.value!r} is not one of {list(spec.choices)}")
        return False
    element = spec.sub if spec.type == ARRAY else spec.type
    if element in (STRING, BOOL) or not values:
        return True
    a = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(a) if element in _FLOATS else np.zeros(a.shape, bool)
    if spec.lo is not None:
        bad |= a < spec.lo
    if spec.hi is not None:
        bad |= a > spec.hi
    if spec.above is not None:
        bad |= a <= spec.above
    if bad.any():
        where = f"[{int(np.argmax(bad))}]" if spec.type == ARRAY else ""
        lo = f"> {spec.above}" if spec.above is not None else f">= {spec.lo}" if spec.lo is not None else ""
        rule = " and ".join(r for r in (("finite" if element in _FLOATS else ""), lo,
                                         f"<= {spec.hi}" if spec.hi is not None else "") if r)
        problems.append(f"key {name!r}{where} = {values[int(np.argmax(bad))]!r} is out of range (must be {rule})")
        return False
    return True


def _check_keys(info: GGUFInfo, tables: dict[str, Key], problems: list[str]) -> dict[str, Any]:
    """Type- and range-check every key the tables know; refuse unknown keys in the namespaces
    llama.cpp interprets; return the values that passed (only those feed derived checks)."""
    strict = STRICT_PREFIXES[info.architecture]
    good: dict[str, Any] = {}
    for name, f in info.fields.items():
        spec = tables.get(name)
        if spec is None and name.startswith(NAMED_TEMPLATE):
            spec = Key(STRING)
        if spec is None:
            owners = [p for p, keys in PROJECTOR_KEYS.items() if name in keys]
            if owners:  # a key of another projector: the projector type is what is wrong, or the key
                proj = info.fields["clip.projector_type"].value if "clip.projector_type" in info.fields else None
                problems.append(f"key {name!r} belongs to projector type {' / '.join(owners)}, but "
                                f"clip.projector_type is {proj!r}")
            elif name.startswith(strict):
                problems.append(f"unknown key {name!r} ({f.type_name}): not one edgelmm writes, and llama.cpp "
                                "may act on it")
            continue
        if _check_key(name, f, spec, problems):
            good[name] = f.value
    for name, spec in tables.items():
        if spec.required and name not in info.fields:
            problems.append(f"metadata key {name!r} is missing")
    return good


@dataclass(frozen=True)
class Expect:
    dims: tuple[int, ...]
    types: frozenset
    required: bool = True


def _strip(dims) -> tuple[int, ...]:
    dims = tuple(dims)
    while dims and dims[-1] == 1:    # ggml pads every tensor to 4 dims with 1s
        dims = dims[:-1]
    return dims


_BLOCK = re.compile(r"^(?:v\.)?blk\.(\d+)\.")


def _check_tensors(info: GGUFInfo, expected: dict[str, Expect], n_layer: int, problems: list[str]) -> None:
    for name, want in expected.items():
        t = info.tensor_infos.get(name)
        if t is None:
            if want.required:
                problems.append(f"tensor {name!r} is missing")
            continue
        if _strip(t.dims) != _strip(want.dims):
            problems.append(f"tensor {name!r} has shape {list(t.dims)}, the metadata implies {list(want.dims)}")
        if t.type_name not in want.types:
            problems.append(f"tensor {name!r} is {t.type_name}; llama.cpp needs {'/'.join(sorted(want.types))} there")
    for name in info.tensor_infos:
        if name not in expected:
            block = _BLOCK.match(name)
            if block and int(block.group(1)) >= n_layer:
                problems.append(f"tensor {name!r} belongs to block {block.group(1)} but block_count is {n_layer}")
            else:
                problems.append(f"unexpected tensor {name!r} (not one llama.cpp loads for this model)")


def _check_vocab(m: dict[str, Any], model: str | None, arch: str, problems: list[str]) -> int | None:
    """The token list and what refers to it; returns the vocabulary size."""
    tokens = m.get("tokenizer.ggml.tokens")
    if tokens is None:
        return None
    n = len(tokens)
    # llama-vocab renames empty tokens, then asserts that no two tokens share a text
    texts = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    if len(set(texts)) != n:
        first: dict[str, int] = {}
        for i, t in enumerate(texts):
            if t in first:
                problems.append(f"key 'tokenizer.ggml.tokens': tokens {first[t]} and {i} have the same text {t!r} "
                                "(llama.cpp aborts on a duplicate)")
                break
            first[t] = i
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        if key in m and len(m[key]) != n:
            problems.append(f"key {key!r} has {len(m[key])} entries for {n} tokens")
    types = m.get("tokenizer.ggml.token_type")
    if types is not None and len(types) == n:
        for i in (i for i, t in enumerate(types) if t == 6):  # BYTE: llama.cpp parses text[3:5] as hex
            if not re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tokens[i]):
                problems.append(f"key 'tokenizer.ggml.tokens': byte token {i} is {tokens[i]!r}, not <0xXX>")
                break
    if model == "llama":
        # sentencepiece byte fallback: llama.cpp throws (std::terminate) on a byte it cannot map
        have = set(texts)
        missing = [b for b in range(256) if f"<0x{b:02X}>" not in have
                   and (b == 0 or bytes([b]).decode("utf-8", "surrogateescape") not in have)]
        if missing:
            problems.append(f"key 'tokenizer.ggml.tokens': a sentencepiece vocabulary without the byte token "
                            f"<0x{missing[0]:02X}> ({len(missing)} of 256 missing)")
    if f"{arch}.vocab_size" in m and m[f"{arch}.vocab_size"] != n:
        problems.append(f"key '{arch}.vocab_size' = {m[f'{arch}.vocab_size']} but the vocabulary has {n} tokens")
    for key, value in m.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id") and value >= n:
            problems.append(f"key {key!r} = {value} is outside the vocabulary of {n} tokens")
    # llama.cpp's defaults (llama-vocab.cpp): sentencepiece adds BOS (id 1), byte-level BPE does for llama-bpe
    default_bos = {"llama": True, "gpt2": m.get("tokenizer.ggml.pre") in ("llama-bpe", "llama3")}.get(model, False)
    for what, default_id, default_add in (("bos", 1 if model == "llama" else 11, default_bos),
                                          ("eos", 2 if model == "llama" else 11, False)):
        if m.get(f"tokenizer.ggml.add_{what}_token", default_add):
            tid = m.get(f"tokenizer.ggml.{what}_token_id", default_id)
            if tid >= n:
                problems.append(f"key 'tokenizer.ggml.add_{what}_token' is set but there is no {what.upper()} "
                                f"token (tokenizer.ggml.{what}_token_id); llama.cpp asserts on it")
    if model == "gpt2" and "tokenizer.ggml.merges" not in m:
        problems.append("metadata key 'tokenizer.ggml.merges' is missing (a gpt2 vocabulary needs it)")
    return n


def _check_text(info: GGUFInfo, problems: list[str]) -> None:
    """An LLM GGUF of one of the text architectures edgelmm writes (gguf_names.TEXT_ARCHES)."""
    arch = info.architecture
    m = _check_keys(info, {**GENERAL_KEYS, **TEXT_KEYS[arch], **TOKENIZER_KEYS}, problems)
    vocab = _check_vocab(m, m.get("tokenizer.ggml.model"), arch, problems)
    need = tuple(f"{arch}.{k}" for k in ("embedding_length", "block_count", "feed_forward_length",
                                          "attention.head_count"))
    if any(k not in m for k in need) or vocab is None:
        return  # the shapes below derive from these; their problems are already reported
    d, n_layer, ff, n_head = (m[k] for k in need)
    n_kv = m.get(f"{arch}.attention.head_count_kv", n_head)
    if f"{arch}.attention.key_length" not in m and d % n_head:
        problems.append(f"key '{arch}.attention.head_count' = {n_head} does not divide embedding_length {d}")
        return
    head_k = m.get(f"{arch}.attention.key_length", d // n_head)
    head_v = m.get(f"{arch}.attention.value_length", d // n_head)
    n_rot = m.get(f"{arch}.rope.dimension_count", head_k)
    before = len(problems)
    if n_kv > n_head or n_head % n_kv:
        problems.append(f"key '{arch}.attention.head_count_kv' = {n_kv} does not divide head_count {n_head}")
    if head_v != head_k:  # the graphs GGML_ASSERT equal key and value heads
        problems.append(f"key '{arch}.attention.value_length' = {head_v} differs from key_length {head_k}")
    if n_rot != head_k or n_rot % 2:
        problems.append(f"key '{arch}.rope.dimension_count' = {n_rot}, llama.cpp needs the head size {head_k} (even)")
    sections = m.get(f"{arch}.rope.dimension_sections")
    if sections is not None and sum(sections) != n_rot // 2:
        problems.append(f"key '{arch}.rope.dimension_sections' = {list(sections)} must add up to half the rotary "
                        f"dimension ({n_rot // 2})")
    if len(problems) > before:
        return
    mat, norm = MATRIX_TYPES, NORM_TYPES
    expected = {"token_embd.weight": Expect((d, vocab), mat),
                "output_norm.weight": Expect((d,), norm),
                "output.weight": Expect((d, vocab), mat, required=False),      # absent: tied to token_embd
                "rope_freqs.weight": Expect((n_rot // 2,), norm, required=False)}  # Llama-3.1 rope factors
    for i in range(n_layer):
        for name, dims, types in (("attn_norm", (d,), norm), ("ffn_norm", (d,), norm),
                                  ("attn_q", (d, n_head * head_k), mat), ("attn_k", (d, n_kv * head_k), mat),
                                  ("attn_v", (d, n_kv * head_v), mat), ("attn_output", (n_head * head_k, d), mat),
                                  ("ffn_gate", (d, ff), mat), ("ffn_up", (d, ff), mat), ("ffn_down", (ff, d), mat)):
            expected[f"blk.{i}.{name}.weight"] = Expect(dims, types)
        if arch == "qwen2vl":  # Qwen2's Q/K/V biases (llama.cpp loads them where present)
            for name, width in (("attn_q", n_head * head_k), ("attn_k", n_kv * head_k), ("attn_v", n_kv * head_v)):
                expected[f"blk.{i}.{name}.bias"] = Expect((width,), norm, required=False)
    _check_tensors(info, expected, n_layer, problems)


def _check_clip(info: GGUFInfo, problems: list[str]) -> None:
    proj = info.metadata.get("clip.projector_type")
    projector_keys = PROJECTOR_KEYS.get(proj, {}) if isinstance(proj, str) else {}
    m = _check_keys(info, {**GENERAL_KEYS, **CLIP_KEYS, **projector_keys}, problems)
    need = ("clip.projector_type", "clip.vision.embedding_length", "clip.vision.feed_forward_length",
            "clip.vision.block_count", "clip.vision.attention.head_count", "clip.vision.image_size",
            "clip.vision.patch_size", "clip.vision.projection_dim")
    if any(k not in m for k in need):
        return
    proj, d, ff, n_layer, n_head, size, patch, proj_dim = (m[k] for k in need)
    before = len(problems)
    if d % n_head:
        problems.append(f"key 'clip.vision.attention.head_count' = {n_head} does not divide embedding_length {d}")
    elif m.get("clip.vision.attention.head_dim", d // n_head) != d // n_head:
        problems.append(f"key 'clip.vision.attention.head_dim' = {m['clip.vision.attention.head_dim']}, "
                        f"the tensors need {d // n_head}")
    if m.get("clip.vision.attention.head_count_kv", n_head) != n_head:
        problems.append(f"key 'clip.vision.attention.head_count_kv' = {m['clip.vision.attention.head_count_kv']} "
                        f"differs from head_count {n_head}")
    if patch > size:  # the grid is image_size // patch_size a side (SigLIP-so400m: 384 // 14 = 27)
        problems.append(f"key 'clip.vision.patch_size' = {patch} is larger than image_size {size}")
    if m.get("clip.use_gelu") and m.get("clip.use_silu"):
        problems.append("keys 'clip.use_gelu' and 'clip.use_silu' are both set")
    side = size // patch
    layers = m.get("clip.vision.feature_layer", [])
    if any(v > n_layer for v in layers) or len(set(layers)) != len(layers):
        problems.append(f"key 'clip.vision.feature_layer' = {layers}: indices must be distinct, in 0..{n_layer}")
    scale = m.get("clip.vision.projector.scale_factor", 1)
    if side % scale:
        problems.append(f"key 'clip.vision.projector.scale_factor' = {scale} does not divide the {side}x{side} "
                        "patch grid")
    if ff == d and proj in SWAPPED_FFN_PROJECTORS:
        problems.append(f"key 'clip.vision.feed_forward_length' = {ff} equals embedding_length: clip.cpp takes such "
                        "an MLP for a legacy file with ffn_up and ffn_down swapped")
    if proj in QWEN_PROJECTORS and (d // n_head) % 4:
        problems.append(f"the vision heads are {d // n_head} wide; clip.cpp's 2-D rotary for Qwen needs a "
                        "multiple of 4")
    if len(problems) > before:
        return
    if proj in QWEN_PROJECTORS:
        expected = _qwen_tower(proj, d, ff, n_layer, patch, proj_dim)
    else:
        expected = _siglip_tower(info, proj, d, ff, n_layer, side, patch, proj_dim, layers, scale)
    _check_tensors(info, expected, n_layer, problems)


def _siglip_tower(info: GGUFInfo, proj: str, d: int, ff: int, n_layer: int, side: int, patch: int, proj_dim: int,
                  layers: list[int], scale: int) -> dict[str, Expect]:
    """The tensors of a SigLIP/CLIP tower with the mlp (LLaVA) or idefics3 projector."""
    mat, norm = MATRIX_TYPES, NORM_TYPES
    cls = "v.class_embd" in info.tensor_infos   # a CLIP tower (forced LLaVA-CLIP export); SigLIP has none
    expected = {"v.patch_embd.weight": Expect((patch, patch, 3, d), SMALL_TYPES),
                "v.patch_embd.bias": Expect((d,), norm, required=not cls),
                "v.position_embd.weight": Expect((d, side * side + cls), SMALL_TYPES),
                "v.class_embd": Expect((d,), norm, required=False),
                "v.pre_ln.weight": Expect((d,), norm, required="v.pre_ln.bias" in info.tensor_infos),
                "v.pre_ln.bias": Expect((d,), norm, required="v.pre_ln.weight" in info.tensor_infos)}
    for i in range(n_layer):
        for name, dims in (("attn_q", (d, d)), ("attn_k", (d, d)), ("attn_v", (d, d)), ("attn_out", (d, d)),
                           ("ffn_up", (d, ff)), ("ffn_down", (ff, d)), ("ln1", None), ("ln2", None)):
            expected[f"v.blk.{i}.{name}.weight"] = Expect((d,), norm) if dims is None else Expect(dims, mat)
            expected[f"v.blk.{i}.{name}.bias"] = Expect((dims[1] if dims else d,), norm)
    if proj == "mlp":
        # llama.cpp's llava graph stacks the (distinct) feature layers, then mm.0 -> GELU -> mm.2;
        # mm.0.bias, mm.2.weight and mm.2.bias are dereferenced unconditionally
        n_stack = max(1, len(layers))
        expected |= {"mm.0.weight": Expect((d * n_stack, proj_dim), mat), "mm.0.bias": Expect((proj_dim,), norm),
                     "mm.2.weight": Expect((proj_dim, proj_dim), mat), "mm.2.bias": Expect((proj_dim,), norm)}
    else:  # idefics3: pixel shuffle by the scale factor, one linear layer, after the post-layernorm
        expected |= {"v.post_ln.weight": Expect((d,), norm), "v.post_ln.bias": Expect((d,), norm),
                     "mm.model.fc.weight": Expect((d * scale * scale, proj_dim), mat)}
    return expected


def _qwen_tower(proj: str, d: int, ff: int, n_layer: int, patch: int, proj_dim: int) -> dict[str, Expect]:
    """Qwen2-VL / Qwen2.5-VL: the frame pair's two patch kernels, fused-QKV blocks split into three,
    LayerNorms with bias (Qwen2-VL) or RMSNorms without (Qwen2.5-VL, whose MLP is gated), and the
    merger: post_ln, then mm.0 over 2x2 patches (4 x width) and mm.2 to the text width."""
    mat, norm = MATRIX_TYPES, NORM_TYPES
    gated = proj == "qwen2.5vl_merger"
    expected = {"v.patch_embd.weight": Expect((patch, patch, 3, d), SMALL_TYPES),
                "v.patch_embd.weight.1": Expect((patch, patch, 3, d), SMALL_TYPES),
                "v.post_ln.weight": Expect((d,), norm),
                "mm.0.weight": Expect((4 * d, 4 * d), mat), "mm.0.bias": Expect((4 * d,), norm),
                "mm.2.weight": Expect((4 * d, proj_dim), mat), "mm.2.bias": Expect((proj_dim,), norm)}
    if not gated:
        expected["v.post_ln.bias"] = Expect((d,), norm)
    for i in range(n_layer):
        mats = [("attn_q", (d, d)), ("attn_k", (d, d)), ("attn_v", (d, d)), ("attn_out", (d, d)),
                ("ffn_up", (d, ff)), ("ffn_down", (ff, d))] + ([("ffn_gate", (d, ff))] if gated else [])
        for name, dims in mats:
            expected[f"v.blk.{i}.{name}.weight"] = Expect(dims, mat)
            expected[f"v.blk.{i}.{name}.bias"] = Expect((dims[1],), norm)
        for name in ("ln1", "ln2"):
            expected[f"v.blk.{i}.{name}.weight"] = Expect((d,), norm)
            if not gated:
                expected[f"v.blk.{i}.{name}.bias"] = Expect((d,), norm)
    return expected


def validate_gguf(path: str | Path, architecture: str | None = None) -> GGUFInfo:
    """read_gguf plus everything llama.cpp / clip.cpp will read for the architectures edgelmm writes
    (module docstring): keys, types, ranges, the vocabulary, and every tensor's presence, shape and
    type. Raises one GGUFError listing the first problems. `architecture` LLM ("llm") takes any of
    the text architectures."""
    info = read_gguf(path)
    wanted = tuple(TEXT_ARCHES) if architecture == LLM else (architecture,)
    if architecture and info.architecture not in wanted:
        raise GGUFError(f"architecture {info.architecture!r}, expected {' or '.join(map(repr, wanted))}",
                        path=str(path))
    problems: list[str] = []
    if info.architecture in TEXT_ARCHES:
        _check_text(info, problems)
    elif info.architecture == "clip":
        _check_clip(info, problems)
    else:
        problems.append(f"architecture {info.architecture!r} is not one edgelmm writes "
                        f"({', '.join(TEXT_ARCHES)}, clip)")
    if problems:
        more = f" (and {len(problems) - MAX_PROBLEMS} more)" if len(problems) > MAX_PROBLEMS else ""
        raise GGUFError("; ".join(problems[:MAX_PROBLEMS]) + more, path=str(path))
    return info


# ------------------------------------------------------------------------------------ token embeddings

@dataclass(frozen=True)
class TensorRef:
    """The shape (ggml order, like gguf-py's ReaderTensor.shape) and type of a tensor."""
    name: str
    shape: tuple[int, ...]
    tensor_type: Any          # gguf.GGMLQuantizationType


class TokenEmbeddings:
    """Rows of token_embd.weight, read from the mmap'ed file and dequantized on demand (never the
    whole table: at 128k x 4096 that would be 2 GB of float32 on a device that holds the model in
    4 bits). `.dim` is the width, `.vocab` (= `.tensor.shape[-1]`) the number of rows."""

    def __init__(self, info: GGUFInfo):
        import gguf

        t = info.tensor_infos.get("token_embd.weight")
        if t is None:
            raise GGUFError("no token_embd.weight tensor", path=str(info.path))
        if len(_strip(t.dims)) > 2 or math.prod(t.dims) == 0:
            raise GGUFError(f"token_embd.weight has shape {list(t.dims)}, not [dim, vocab]", path=str(info.path))
        self.dim, self.vocab = (tuple(t.dims) + (1, 1))[:2]
        qtype = gguf.GGMLQuantizationType(t.type_id)
        if t.type_name not in ("F32", "F16") and qtype not in getattr(gguf.quants, "_type_traits", {qtype: None}):
            raise GGUFError(f"token_embd.weight is {t.type_name}, which gguf-py cannot dequantize", path=str(info.path))
        self._gguf, self._qtype = gguf, qtype
        self.tensor = TensorRef(t.name, (self.dim, self.vocab), qtype)
        self._rows = np.memmap(info.path, dtype=np.uint8, mode="r", offset=t.data_start,
                               shape=(self.vocab, t.nbytes // self.vocab))

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        flat = np.asarray(ids, np.int64).reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.vocab):
            raise IndexError(f"token id outside 0..{self.vocab - 1}")
        raw = np.ascontiguousarray(self._rows[flat])   # copies only the requested rows
        if self._qtype.name == "F32":
            rows = raw.view("<f4")
        elif self._qtype.name == "F16":
            rows = raw.view("<f2")
        else:
            rows = self._gguf.quants.dequantize(raw, self._qtype)
        return rows.astype(np.float32).reshape(*np.shape(ids), self.dim)
