"""GPU paths, against the CPU on the same tiny checkpoints and bundles. Each test skips, saying why,
on a machine without what it needs (CI is CPU only); `edgelmm doctor` shows what a machine has."""

import shutil

import pytest

from edgelmm.runtimes.select import detect_platform, probe_onnxruntime, probe_tensorrt
from edgelmm.verify import THRESHOLDS, verify

pytestmark = pytest.mark.gpu

PLATFORM = detect_platform()
NO_GPU = "no NVIDIA GPU on this machine (no /dev/nvidia*, no /dev/nvhost-ctrl-gpu)"
# TF32 and fp16 kernels on GPUs: compare as fp16 is compared (direction, distribution, answers).
GPU_LIMITS = THRESHOLDS["fp16"]


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _torch_cuda(), reason="torch sees no CUDA GPU here (CPU-only build or no GPU)")
def test_torch_reference_on_cuda_matches_cpu(checkpoint, pipelines):
    import edgelmm

    for kind in ("llava-siglip", "idefics3"):
        gpu = edgelmm.load(checkpoint(kind), backend="torch", device="cuda")
        assert gpu.describe()["device"] == "cuda"
        report = verify(gpu, pipelines(kind), "fp16", thresholds=GPU_LIMITS)
        assert report["passed"], report["failures"]


def _ort_provider_runs(name: str) -> bool:
    if not PLATFORM.has_gpu:
        return False
    return any(p.name == f"onnxruntime:{name}" and p.runs for p in probe_onnxruntime(PLATFORM))


@pytest.mark.skipif(not _ort_provider_runs("CUDAExecutionProvider"),
                    reason=NO_GPU if not PLATFORM.has_gpu else
                    "ONNX Runtime's CUDA provider does not run here (see `edgelmm doctor`)")
def test_onnxruntime_cuda_provider_matches_cpu(bundle):
    import edgelmm

    path = bundle("llava-siglip")
    cpu = edgelmm.load(path, backend="onnxruntime", provider="cpu")
    gpu = edgelmm.load(path, backend="onnxruntime", provider="cuda")
    assert gpu.backend.providers[0] == "CUDAExecutionProvider" and gpu.backend.kv_device == "cuda"
    # TF32 is off (GpuOptions.tf32): an fp32 graph on the CUDA provider meets the fp32 limits
    report = verify(gpu, cpu, "fp32")
    assert report["passed"], report["failures"]
    assert gpu.backend.sessions["decoder"].get_provider_options()["CUDAExecutionProvider"]["use_tf32"] == "0"


@pytest.mark.skipif(not _ort_provider_runs("CUDAExecutionProvider"),
                    reason=NO_GPU if not PLATFORM.has_gpu else
                    "ONNX Runtime's CUDA provider does not run here (see `edgelmm doctor`)")
def test_cuda_graph_decode_matches_the_uncaptured_step(checkpoint, tmp_path):
    """GpuOptions.cuda_graph: the fused fp16 decoder's step captured as a CUDA graph and replayed
    gives the greedy tokens of the same graph run step by step, over several generations (ONNX
    Runtime warms up, captures, then replays), batched, after a prompt too long for the slot (that
    generation runs uncaptured), and with the slot reused afterwards; an fp32 decoder is refused."""
    import edgelmm
    from edgelmm.errors import BackendUnavailable
    from edgelmm.export import export
    from edgelmm.images import sample_images
    from edgelmm.runtimes.onnxruntime import GpuOptions

    path = export(checkpoint("llava-siglip"), tmp_path / "bundle", ["onnx"], precisions=["fp32", "fp16"],
                  verify=False, quiet=True)
    stepwise = edgelmm.load(path, backend="onnxruntime", provider="cuda", precision="fp16", layout="fused")
    graph = edgelmm.load(path, backend="onnxruntime", provider="cuda", precision="fp16",
                         gpu_options=GpuOptions(cuda_graph=True, cuda_graph_context=128))
    assert graph.describe()["decoder_layout"] == "fused" and graph.describe()["kv_device"] == "cuda"
    options = graph.backend.sessions["decoder"].get_provider_options()["CUDAExecutionProvider"]
    assert options["enable_cuda_graph"] == "1"
    assert "enable_cuda_graph" not in graph.backend.sessions["vision"].get_provider_options()["CUDAExecutionProvider"] \
        or graph.backend.sessions["vision"].get_provider_options()["CUDAExecutionProvider"]["enable_cuda_graph"] == "0"
    short = ("What is in <image>?", sample_images(1, seed=1))
    long = ("Compare <image> and <image>: which has more shapes?", sample_images(2, seed=2))
    assert len(graph.prepare(*long).input_ids) > 128 > len(graph.prepare(*short).input_ids)
    for prompt, images in (short, short, short, long, short):
        want = stepwise.generate(prompt, images, max_new_tokens=12, chat=False).token_ids
        assert graph.generate(prompt, images, max_new_tokens=12, chat=False).token_ids == want
    requests = [short, ("Describe <image>.", sample_images(1, seed=3))]
    for _ in range(3):
        assert [g.token_ids for g in graph.generate_batch(requests, max_new_tokens=8)] == \
            [g.token_ids for g in stepwise.generate_batch(requests, max_new_tokens=8)]
    assert graph.describe()["cuda_graph"]["batch_sizes"] == [1, 2]
    with pytest.raises(BackendUnavailable, match="fused fp16 decoder"):
        edgelmm.load(path, backend="onnxruntime", provider="cuda", precision="fp32",
                     gpu_options=GpuOptions(cuda_graph=True))


@pytest.mark.skipif(not PLATFORM.has_gpu or not probe_tensorrt(PLATFORM)[0].runs,
                    reason=NO_GPU if not PLATFORM.has_gpu else "TensorRT 10 does not run here (see `edgelmm doctor`)")
def test_tensorrt_engines_build_load_and_match(bundle, tmp_path):
    import edgelmm
    from edgelmm.export.tensorrt import EngineOptions, build_engines

    path = tmp_path / "bundle"
    shutil.copytree(bundle("llava-siglip"), path)
    result = build_engines(path, EngineOptions(precisions=("fp16", "int4"), max_images=4, max_context=512,
                                               timing_cache=str(tmp_path / "timing.cache")))
    assert all(r["passed"] for r in result["verify"].values()), result["verify"]
    assert (tmp_path / "timing.cache").stat().st_size > 0
    pipe = edgelmm.load(path)  # auto: the engines come first on a GPU
    assert pipe.describe()["backend"] == "tensorrt" and pipe.describe()["kv_device"] == "cuda"
    # the build already verified each precision; here the engines answer through the public API
    answer = pipe.generate("Compare <image> with <image>.", [str(p) for p in _images(tmp_path)], max_new_tokens=8)
    assert len(answer.token_ids) >= 1 and answer.finish_reason in ("length", "stop")


def _images(tmp_path):
    from PIL import Image

    from edgelmm.images import sample_images

    out = []
    for i, img in enumerate(sample_images(2, seed=7)):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(img).save(p)
        out.append(p)
    return out
