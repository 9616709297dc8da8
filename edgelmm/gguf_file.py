"""Reading and validating GGUF files before llama.cpp sees them.

llama.cpp aborts the whole process (GGML_ASSERT) on some malformed files instead of returning an
error, so every GGUF is checked here first with gguf-py's reader: magic, version, that every
tensor lies inside the file, and that tensor shapes agree with the file's own metadata (the
shapes llama.cpp's loaders will demand). Runtime side: needs only numpy and gguf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GGUFError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)


@dataclass
class GGUFInfo:
    path: Path
    architecture: str
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, tuple[str, tuple[int, ...]]]   # name -> (type name, ggml dims: ne0 first)
    reader: Any = field(repr=False, default=None)


def _field_value(f) -> Any:
    import gguf

    types = f.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == gguf.GGUFValueType.STRING:
            return len(f.data)  # token lists: only their length matters here
        return [f.parts[i].tolist()[0] for i in f.data]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")
    return f.parts[f.data[0]].tolist()[0]


def read_gguf(path: str | Path) -> GGUFInfo:
    """Parse a GGUF file, raising GGUFError (naming the file) for anything malformed."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise GGUFError("missing", path=str(path))
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8:
        raise GGUFError(f"only {size} bytes: not a GGUF file (truncated)", path=str(path))
    if head[:4] != GGUF_MAGIC:
        raise GGUFError(f"wrong magic {head[:4]!r} (a GGUF file starts with {GGUF_MAGIC!r})", path=str(path))
    version = int.from_bytes(head[4:8], "little")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"GGUF version {version} is not one llama.cpp reads {SUPPORTED_VERSIONS}", path=str(path))
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf-py raises ValueError/IndexError/struct errors on damaged files
        raise GGUFError(f"malformed GGUF ({type(exc).__name__}: {exc}); the file is truncated or corrupt",
                        path=str(path)) from None
    tensors = {}
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if end > size or t.data.nbytes != t.n_bytes:
            raise GGUFError(f"tensor {t.name!r} ends at byte {end} but the file has {size} (truncated)", path=str(path))
        tensors[t.name] = (t.tensor_type.name, tuple(int(d) for d in t.shape))
    metadata = {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError("no general.architecture key", path=str(path))
    return GGUFInfo(path, arch, version, metadata, tensors, reader)


def _expect(info: GGUFInfo, name: str, dims: tuple[int, ...], problems: list[str], optional: bool = False) -> None:
    if name not in info.tensors:
        if not optional:
            problems.append(f"tensor {name!r} is missing")
        return
    got = info.tensors[name][1]
    if got != dims:
        problems.append(f"tensor {name!r} has shape {list(got)}, the metadata implies {list(dims)}")


def _check_llama(info: GGUFInfo, problems: list[str]) -> None:
    m = info.metadata
    try:
        d, n_layer, ff = m["llama.embedding_length"], m["llama.block_count"], m["llama.feed_forward_length"]
        n_head = m["llama.attention.head_count"]
        n_kv = m.get("llama.attention.head_count_kv", n_head)
    except KeyError as exc:
        problems.append(f"metadata key {exc.args[0]!r} is missing")
        return
    head = m.get("llama.attention.key_length", d // n_head)
    vocab = m.get("tokenizer.ggml.tokens") or info.tensors.get("token_embd.weight", ("", (0, 0)))[1][-1]
    _expect(info, "token_embd.weight", (d, vocab), problems)
    _expect(info, "output_norm.weight", (d,), problems)
    _expect(info, "output.weight", (d, vocab), problems, optional=True)
    for i in range(n_layer):
        for name, dims in (("attn_norm", (d,)), ("ffn_norm", (d,)), ("attn_q", (d, n_head * head)),
                           ("attn_k", (d, n_kv * head)), ("attn_v", (d, n_kv * head)),
                           ("attn_output", (n_head * head, d)), ("ffn_gate", (d, ff)), ("ffn_up", (d, ff)),
                           ("ffn_down", (ff, d))):
            _expect(info, f"blk.{i}.{name}.weight", dims, problems)


def _check_clip(info: GGUFInfo, problems: list[str]) -> None:
    m = info.metadata
    try:
        d, ff, n_layer = m["clip.vision.embedding_length"], m["clip.vision.feed_forward_length"], m["clip.vision.block_count"]
        size, patch = m["clip.vision.image_size"], m["clip.vision.patch_size"]
        proj_dim, proj = m["clip.vision.projection_dim"], m["clip.projector_type"]
    except KeyError as exc:
        problems.append(f"metadata key {exc.args[0]!r} is missing")
        return
    n_pos = (size // patch) ** 2 + (1 if "v.class_embd" in info.tensors else 0)
    _expect(info, "v.patch_embd.weight", (patch, patch, 3, d), problems)
    _expect(info, "v.position_embd.weight", (d, n_pos), problems)
    layers = m.get("clip.vision.feature_layer") or [n_layer - 1]
    for i in range(n_layer):
        for name, dims in (("attn_q", (d, d)), ("attn_k", (d, d)), ("attn_v", (d, d)), ("attn_out", (d, d)),
                           ("ffn_up", (d, ff)), ("ffn_down", (ff, d)), ("ln1", (d,)), ("ln2", (d,))):
            _expect(info, f"v.blk.{i}.{name}.weight", dims, problems)
    if proj == "mlp":
        hidden = info.tensors.get("mm.0.weight", ("", (0, 0)))[1][-1]
        _expect(info, "mm.0.weight", (d * len(layers), hidden), problems)
        _expect(info, "mm.2.weight", (hidden, proj_dim), problems)
    elif proj == "idefics3":
        scale = m.get("clip.vision.projector.scale_factor", 2)
        _expect(info, "mm.model.fc.weight", (d * scale * scale, proj_dim), problems)
    else:
        problems.append(f"projector type {proj!r} is not one edgelmm writes (mlp, idefics3)")


def validate_gguf(path: str | Path, architecture: str | None = None) -> GGUFInfo:
    """read_gguf plus: the expected architecture, and every tensor llama.cpp will look up present
    with the shape the file's own metadata implies."""
    info = read_gguf(path)
    if architecture and info.architecture != architecture:
        raise GGUFError(f"architecture {info.architecture!r}, expected {architecture!r}", path=str(path))
    problems: list[str] = []
    if info.architecture == "llama":
        _check_llama(info, problems)
    elif info.architecture == "clip":
        _check_clip(info, problems)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise GGUFError("; ".join(problems[:3]) + more, path=str(path))
    return info


class TokenEmbeddings:
    """Rows of token_embd.weight, dequantized on demand (never the whole table: at 128k x 4096 that
    would be 2 GB of float32 on a device that holds the model in 4 bits)."""

    def __init__(self, info: GGUFInfo):
        import gguf

        tensor = next((t for t in info.reader.tensors if t.name == "token_embd.weight"), None)
        if tensor is None:
            raise GGUFError("no token_embd.weight tensor", path=str(info.path))
        self._gguf, self.tensor = gguf, tensor
        self.dim = int(tensor.shape[0])

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        flat = np.asarray(ids, np.int64).reshape(-1)
        rows = self.tensor.data[flat]
        if self.tensor.tensor_type.name not in ("F32", "F16"):
            rows = self._gguf.quants.dequantize(rows, self.tensor.tensor_type)
        return rows.astype(np.float32).reshape(*np.shape(ids), self.dim)
