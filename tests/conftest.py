import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

KINDS = ["llava-siglip", "llava-clip", "idefics2", "idefics3"]


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


@pytest.fixture(scope="session")
def bundle(checkpoint, tmp_path_factory):
    """bundle(kind) -> an ONNX bundle exported (and verified) from the tiny checkpoint (built once)."""
    from edgelmm.export import export

    root = tmp_path_factory.mktemp("bundles")
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = export(checkpoint(kind), root / kind, quiet=True)
        return cache[kind]

    return get
