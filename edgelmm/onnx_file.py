"""Which files an ONNX graph makes ONNX Runtime open: its external-data locations, read from the
protobuf wire format without the `onnx` package (the device side does not install it).

A graph in a bundle is hashed, but the weights it points to (`TensorProto.external_data`,
key "location") are opened by ONNX Runtime itself, so a damaged or hostile graph could make it read
any file. The ONNX Runtime backend checks that every location is one of the artifact's hashed files
before a session is created. Walks the model's graph: initializers, sparse initializers and node
attributes (Constant tensors, subgraphs of If/Loop/Scan), with bounded nesting; every length is
checked against the bytes left, so a damaged file is a BundleError, never a loop or a huge read.
"""

from __future__ import annotations

import mmap
from pathlib import Path

from .errors import BundleError

# Field numbers of onnx.proto3 that can lead to a TensorProto.
MODEL_GRAPH = 7
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_SPARSE_INITIALIZER = 1, 5, 15
NODE_ATTRIBUTE = 5
ATTR_T, ATTR_G, ATTR_TENSORS, ATTR_GRAPHS, ATTR_SPARSE, ATTR_SPARSES = 5, 6, 10, 11, 22, 23
SPARSE_VALUES, SPARSE_INDICES = 1, 2
TENSOR_EXTERNAL_DATA = 13
ENTRY_KEY, ENTRY_VALUE = 1, 2
MAX_DEPTH = 16  # subgraphs inside subgraphs; real models nest two or three deep


class _Malformed(Exception):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("a varint runs past its message")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(buf, start: int, end: int):
    """(field number, wire type, value or (start, end) of a length-delimited field) of one message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise _Malformed("a fixed-size field runs past its message")
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if length > end - pos:
                raise _Malformed(f"a field of {length} bytes runs past its message")
            yield number, wire, (pos, pos + length)
            pos += length
        else:
            raise _Malformed(f"wire type {wire} (groups are not used by ONNX)")


def _tensor(buf, span, out: list[str]) -> None:
    for number, wire, value in _fields(buf, *span):
        if number == TENSOR_EXTERNAL_DATA and wire == 2:
            entry = {n: bytes(buf[v[0]:v[1]]) for n, w, v in _fields(buf, *value) if w == 2}
            if entry.get(ENTRY_KEY) == b"location":
                out.append(entry.get(ENTRY_VALUE, b"").decode("utf-8", errors="replace"))


def _sparse(buf, span, out: list[str]) -> None:
    for number, wire, value in _fields(buf, *span):
        if number in (SPARSE_VALUES, SPARSE_INDICES) and wire == 2:
            _tensor(buf, value, out)


def _graph(buf, span, out: list[str], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _Malformed(f"subgraphs nested over {MAX_DEPTH} deep")
    for number, wire, value in _fields(buf, *span):
        if wire != 2:
            continue
        if number == GRAPH_INITIALIZER:
            _tensor(buf, value, out)
        elif number == GRAPH_SPARSE_INITIALIZER:
            _sparse(buf, value, out)
        elif number == GRAPH_NODE:
            for n, w, attr in _fields(buf, *value):
                if n == NODE_ATTRIBUTE and w == 2:
                    _attribute(buf, attr, out, depth)


def _attribute(buf, span, out: list[str], depth: int) -> None:
    for number, wire, value in _fields(buf, *span):
        if wire != 2:
            continue
        if number in (ATTR_T, ATTR_TENSORS):
            _tensor(buf, value, out)
        elif number in (ATTR_SPARSE, ATTR_SPARSES):
            _sparse(buf, value, out)
        elif number in (ATTR_G, ATTR_GRAPHS):
            _graph(buf, value, out, depth + 1)


def external_data_locations(path: str | Path) -> list[str]:
    """Every external-data location the graph at `path` names, in order (with repeats)."""
    path = Path(path)
    out: list[str] = []
    try:
        with open(path, "rb") as f:
            if path.stat().st_size == 0:
                raise _Malformed("empty file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                for number, wire, value in _fields(buf, 0, len(buf)):
                    if number == MODEL_GRAPH and wire == 2:
                        _graph(buf, value, out, 0)
    except _Malformed as exc:
        raise BundleError(f"not a valid ONNX file ({exc})", path=str(path)) from None
    except OSError as exc:
        raise BundleError(f"cannot read this graph ({exc.strerror})", path=str(path)) from None
    return out


def check_external_data(root: Path, graph_rel: str, hashed: set[str]) -> None:
    """Every file the graph at root/graph_rel makes ONNX Runtime open is one of `hashed` (paths
    relative to the bundle)."""
    folder = graph_rel.rpartition("/")[0]
    for location in dict.fromkeys(external_data_locations(root / graph_rel)):
        parts = location.split("/")
        rel = "/".join([folder, *parts] if folder else parts)
        if location.startswith("/") or "\\" in location or any(p in ("", ".", "..") for p in parts) or rel not in hashed:
            raise BundleError(f"the graph's weights point to {location[:200]!r}, which is not one of the files the "
                              "manifest hashes for it", path=str(root / graph_rel))
