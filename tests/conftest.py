import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One CPU thread for every library (torch's OpenMP before torch is imported, ONNX Runtime, llama.cpp
# through EDGELMM_THREADS): CI shares its cores, and threads that spin while waiting for a peer that
# another process holds cost CPU time for nothing.
os.environ.setdefault("EDGELMM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

KINDS = ["llava-siglip", "llava-clip", "idefics2", "idefics3", "qwen2vl", "qwen2.5vl"]

_BLOCK_TORCH = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('torch', 'transformers'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


def run_without_torch(code: str, timeout: int = 300) -> str:
    """Run `code` in a fresh interpreter where torch and transformers cannot be imported (the device
    side); return its last stdout line."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _BLOCK_TORCH + code], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


def optimized_op_types(path, out) -> dict[str, int]:
    """A Counter of the node types of the ONNX graph at `path` as ONNX Runtime's CPU provider runs it, after its own
    fusions (the optimized graph is written to `out`)."""
    import collections

    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def checkpoint(ckpt_root):
    """checkpoint(kind) -> directory of a tiny saved checkpoint of that family (built once)."""
    from edgelmm.testing import build_tiny_checkpoint

    return lambda kind: build_tiny_checkpoint(kind, ckpt_root)


@pytest.fixture(scope="session")
def pipelines(checkpoint):
    import edgelmm

    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = edgelmm.load(checkpoint(kind), backend="torch")
        return cache[kind]

    return get


def cached_exports(checkpoint, root, **export_kwargs):
    """get(kind) -> the tiny checkpoint of `kind` exported (and verified) under root, once per kind."""
    from edgelmm.export import export

    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = export(checkpoint(kind), root / kind, quiet=True, **export_kwargs)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def bundle(checkpoint, tmp_path_factory):
    """bundle(kind) -> an ONNX bundle exported (and verified) from the tiny checkpoint (built once)."""
    return cached_exports(checkpoint, tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="session")
def reference_bundle(tmp_path_factory):
    """The shipped reference model exported to an ONNX bundle (once). Tests that change a bundle copy it."""
    from edgelmm.export import export
    from edgelmm.models import reference_model

    return export(reference_model(), tmp_path_factory.mktemp("ref") / "bundle", quiet=True)


@pytest.fixture(scope="session")
def reference_gguf_bundle(tmp_path_factory):
    """The reference model exported to ONNX fp32 and the f32 GGUF pair, unverified (once): the fuzz
    campaign's base bundle (its GGUF cases damage the f32 pair, the one llama.cpp then loads) and the
    llama.cpp backend's tests. Tests that change it copy it."""
    from edgelmm.export import export
    from edgelmm.models import reference_model

    return export(reference_model(), tmp_path_factory.mktemp("refgguf") / "bundle", formats=("onnx", "gguf"),
                  gguf_types=("f32",), verify=False, quiet=True)
