"""Which machine this is, what can really run on it, and which backend a bundle should use.

Three questions, kept apart so each can be tested on its own:
  - `detect_platform(root)`: Jetson (model, L4T and JetPack from /etc/nv_tegra_release and the
    device tree), desktop NVIDIA GPU (/proc/driver/nvidia, /dev/nvidia*), or CPU. `root` lets tests
    point it at a fake filesystem.
  - `probe_*`: is a backend importable AND does a tiny session run on it here. Listing providers is
    not enough: onnxruntime-gpu lists CUDA and TensorRT on machines without a GPU and then falls
    back to the CPU without a word.
  - `plan(bundle, platform)`: the fallback chain for one bundle (what artifacts it has x what this
    machine can run), best first, each candidate with the reason it was taken or passed over.
"""

from __future__ import annotations

import logging
import os
import platform as pyplatform
import re
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailable
from .onnxruntime import tensorrt_libraries_load
from .tensorrt import current_engine_target, engine_incompatibility  # engines vs this machine

log = logging.getLogger("edgelmm.select")

# L4T (the Jetson Linux release in /etc/nv_tegra_release) -> JetPack, from NVIDIA's release tables.
L4T_TO_JETPACK = {
    "32.7.1": "4.6.1", "32.7.2": "4.6.2", "32.7.3": "4.6.3", "32.7.4": "4.6.4", "32.7.5": "4.6.5",
    "32.7.6": "4.6.6", "35.1.0": "5.0.2", "35.2.1": "5.1", "35.3.1": "5.1.1", "35.4.1": "5.1.2",
    "35.5.0": "5.1.3", "35.6.0": "5.1.4", "35.6.1": "5.1.5", "36.2.0": "6.0 DP", "36.3.0": "6.0",
    "36.4.0": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1", "38.2.0": "7.0", "38.4.0": "7.1", "39.2.0": "7.2",
}
# What each JetPack line ships (CUDA, TensorRT): the TensorRT backend needs TensorRT 10.3+ (JetPack >= 6.1).
# TensorRT 11 reaches Jetson only from 11.4.1, on JetPack 7.2.2+ (AGX Orin and Thor), never JetPack 6.
JETPACK_STACK = {"4.6": ("10.2", "8.2"), "5.0": ("11.4", "8.4"), "5.1": ("11.4", "8.5"), "6.0": ("12.2", "8.6"),
                 "6.1": ("12.6", "10.3"), "6.2": ("12.6", "10.3"), "7.0": ("13.0", "10.13"), "7.1": ("13.0", "10.13"),
                 "7.2": ("13.2", "10.16")}


@dataclass
class Platform:
    kind: str                                   # "jetson" | "nvidia-gpu" | "cpu"
    machine: str                                # x86_64, aarch64
    cpu: str
    cpu_count: int
    memory_mib: int | None
    jetson_model: str | None = None             # "NVIDIA Jetson AGX Orin Developer Kit"
    l4t: str | None = None                      # "36.4.0"
    jetpack: str | None = None                  # "6.1"
    driver: str | None = None                   # desktop driver version, from /proc/driver/nvidia/version
    gpus: list[dict[str, Any]] = field(default_factory=list)
    gpu_device_nodes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def has_gpu(self) -> bool:
        return self.kind in ("jetson", "nvidia-gpu")

    @property
    def expected_stack(self) -> dict[str, str] | None:
        """CUDA and TensorRT versions this JetPack ships (None off Jetson or for an unknown release)."""
        if not self.jetpack:
            return None
        line = ".".join(self.jetpack.split()[0].split(".")[:2])
        stack = JETPACK_STACK.get(line)
        return {"cuda": stack[0], "tensorrt": stack[1]} if stack else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "has_gpu": self.has_gpu, "expected_stack": self.expected_stack}


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", errors="replace").replace("\x00", "").strip()
    except OSError:
        return None


def parse_nv_tegra_release(text: str) -> str | None:
    """'# R36 (release), REVISION: 4.0, GCID: ...' -> '36.4.0'."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)(?:\.(\d+))?", text)
    if not m:
        return None
    return f"{m.group(1)}.{m.group(2)}.{m.group(3) or 0}"


def jetpack_for(l4t: str | None) -> str | None:
    if not l4t:
        return None
    if l4t in L4T_TO_JETPACK:
        return L4T_TO_JETPACK[l4t]
    # A point release NVIDIA's table does not list: the nearest earlier one of the same major.minor.
    def version(v: str) -> list[int]:
        return [int(x) for x in v.split(".")]

    major_minor = ".".join(l4t.split(".")[:2])
    known = sorted((k for k in L4T_TO_JETPACK if k.startswith(major_minor + ".") and version(k) <= version(l4t)),
                   key=version)
    return f"{L4T_TO_JETPACK[known[-1]]}+" if known else None


def detect_platform(root: str | Path = "/", query_gpu: bool | None = None) -> Platform:
    """Read the platform from the filesystem under `root` (the real one by default). With
    `query_gpu` (default: when root is "/"), GPU names and compute capabilities come from the
    CUDA driver; under a fake root only files are read."""
    root = Path(root)
    query_gpu = str(root) == "/" if query_gpu is None else query_gpu
    cpuinfo = _read(root / "proc/cpuinfo") or ""
    m = re.search(r"^(model name|Model|Hardware)\s*:\s*(.+)$", cpuinfo, re.M)
    meminfo = _read(root / "proc/meminfo") or ""
    mm = re.search(r"MemTotal:\s+(\d+) kB", meminfo)
    cpus = len(re.findall(r"^processor\s*:", cpuinfo, re.M)) or (os.cpu_count() or 1)
    plat = Platform(kind="cpu", machine=pyplatform.machine() if str(root) == "/" else _fake_machine(root),
                    cpu=m.group(2).strip() if m else pyplatform.processor() or "unknown", cpu_count=cpus,
                    memory_mib=int(mm.group(1)) // 1024 if mm else None)

    tegra = _read(root / "etc/nv_tegra_release")
    model = _read(root / "proc/device-tree/model") or _read(root / "sys/firmware/devicetree/base/model")
    compatible = _read(root / "proc/device-tree/compatible") or ""
    plat.gpu_device_nodes = sorted(str(p.relative_to(root)) for p in (root / "dev").glob("nvidia[0-9]*")) \
        if (root / "dev").is_dir() else []
    if (root / "dev/nvhost-ctrl-gpu").exists():
        plat.gpu_device_nodes.append("dev/nvhost-ctrl-gpu")
    if tegra or "nvidia,tegra" in compatible or (model and "jetson" in model.lower()):
        plat.kind = "jetson"
        plat.jetson_model = model or "unknown Jetson"
        plat.l4t = parse_nv_tegra_release(tegra or "")
        plat.jetpack = jetpack_for(plat.l4t)
        if not tegra:
            plat.notes.append("no /etc/nv_tegra_release (a container without the L4T files?): JetPack unknown")
        elif plat.jetpack is None:
            plat.notes.append(f"L4T {plat.l4t} is not in edgelmm's JetPack table")
    else:
        version = _read(root / "proc/driver/nvidia/version")
        if version:
            dm = re.search(r"Kernel Module(?: for \w+)?\s+([\d.]+)", version)
            plat.driver = dm.group(1) if dm else version.splitlines()[0]
        for info in sorted((root / "proc/driver/nvidia/gpus").glob("*/information")):
            text = _read(info) or ""
            name = re.search(r"^Model:\s*(.+)$", text, re.M)
            plat.gpus.append({"name": name.group(1).strip() if name else "unknown", "bus": info.parent.name})
        if plat.driver or plat.gpus or plat.gpu_device_nodes:
            plat.kind = "nvidia-gpu"
    if query_gpu and plat.has_gpu:
        try:
            from .cuda import CudaDriver

            cuda = CudaDriver.get()
            plat.gpus = [g.as_dict() for g in cuda.gpus()]
            plat.notes.append(f"CUDA driver API {cuda.driver_version()}")
        except BackendUnavailable as exc:
            plat.notes.append(f"GPU device files present but the CUDA driver does not answer: {exc}")
    return plat


def _fake_machine(root: Path) -> str:
    """Under a fake root the architecture comes from the files: Jetsons are aarch64."""
    return "aarch64" if (root / "etc/nv_tegra_release").exists() else pyplatform.machine()


# --- probes: import AND run --------------------------------------------------------------------------

@dataclass
class Probe:
    name: str                     # "onnxruntime:CUDAExecutionProvider", "tensorrt", "llamacpp", ...
    importable: bool
    runs: bool
    version: str | None = None
    detail: str = ""
    hint: str | None = None       # what to install when it does not run
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


HINTS = {
    "onnxruntime": "pip install onnxruntime (CPU) or onnxruntime-gpu (desktop NVIDIA, x86_64)",
    "onnxruntime-gpu:jetson": ("install the onnxruntime-gpu wheel built for your JetPack from NVIDIA's Jetson AI Lab "
                               "index (pip install onnxruntime-gpu --index-url https://pypi.jetson-ai-lab.io/jp6/cu126 "
                               "on JetPack 6); PyPI's aarch64 wheel is CPU-only"),
    "onnxruntime-gpu:desktop": ("pip install onnxruntime-gpu (CUDA 12/13 builds) and make sure the CUDA and cuDNN "
                                "libraries it was built for are installed (pip install nvidia-cudnn-cu12 ...)"),
    "ort-tensorrt": ("ONNX Runtime's TensorRT provider needs TensorRT 10's libraries (libnvinfer.so.10) on the library "
                     "path: JetPack 6.1+ has them; on a desktop pip install 'tensorrt-cu12>=10.3,<11' and add its lib "
                     "dir to LD_LIBRARY_PATH (onnxruntime-gpu 1.31 is built against TensorRT 10)"),
    "tensorrt:jetson": ("TensorRT comes with JetPack: sudo apt install nvidia-jetpack (or python3-libnvinfer); in a "
                        "venv, create it with --system-site-packages to see it. edgelmm's engines need TensorRT 10.3+ "
                        "(JetPack 6.1/6.2: 10.3; JetPack 7: 10.13+)"),
    "tensorrt:desktop": ("pip install 'edgelmm[tensorrt]' (TensorRT 11, CUDA 13 drivers r580+) or "
                         "'edgelmm[tensorrt-cu12]' (CUDA 12 drivers); both come from NVIDIA's index via the PyPI shim"),
    "llamacpp": "pip install llama-cpp-python",
    "llamacpp-gpu": ('rebuild llama-cpp-python with CUDA: CMAKE_ARGS="-DGGML_CUDA=on" pip install '
                     "--force-reinstall --no-cache-dir --no-binary llama-cpp-python llama-cpp-python (on Jetson add "
                     '-DCMAKE_CUDA_ARCHITECTURES=87 for Orin, 72 for Xavier)'),
    "torch-cuda": ("install a CUDA build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu126; "
                   "on Jetson NVIDIA's JetPack wheels)"),
}


def _where(plat: Platform) -> str:
    return "jetson" if plat.kind == "jetson" else "desktop"


_PROBE_MODEL = Path(__file__).with_name("probe.onnx")   # Y = X @ W + B, W and B constants (see _probe_expected)


def _probe_expected(x: np.ndarray) -> np.ndarray:
    w = np.arange(16, dtype=np.float32).reshape(4, 4) / 8 - 1
    return x @ w + np.float32(0.5)


def probe_onnxruntime(plat: Platform) -> list[Probe]:
    """One probe per provider ONNX Runtime offers: a session on the tiny probe graph, with only that
    provider, must really run on it (`get_providers()[0]`) and give the right answer."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return [Probe("onnxruntime", False, False, detail=str(exc), hint=HINTS["onnxruntime"])]
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    out = []
    ort.set_default_logger_severity(3)
    for provider in ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"):
        name = f"onnxruntime:{provider}"
        listed = provider in ort.get_available_providers()
        gpu_hint = HINTS["ort-tensorrt"] if provider.startswith("Tensorrt") else HINTS[f"onnxruntime-gpu:{_where(plat)}"]
        if not listed:
            out.append(Probe(name, True, False, ort.__version__, "not in this onnxruntime build",
                             gpu_hint if plat.has_gpu and not provider.startswith("CPU") else None))
            continue
        if provider != "CPUExecutionProvider" and not plat.has_gpu:
            out.append(Probe(name, True, False, ort.__version__,
                             "listed by onnxruntime, but this machine has no NVIDIA GPU", None))
            continue
        missing = tensorrt_libraries_load() if provider.startswith("Tensorrt") else None
        if missing:
            out.append(Probe(name, True, False, ort.__version__, missing, gpu_hint))
            continue
        start = time.perf_counter()
        try:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            sess = ort.InferenceSession(str(_PROBE_MODEL), sess_options=opts, providers=[provider])
            ran_on = sess.get_providers()[0]
            y = sess.run(None, {"x": x})[0]
            ok = ran_on == provider and np.allclose(y, _probe_expected(x), atol=1e-2)
            detail = f"ran on {ran_on}" + ("" if ok else f" (asked for {provider}; wrong provider or wrong answer)")
        except Exception as exc:  # a provider whose libraries are missing raises from inside ORT
            ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        out.append(Probe(name, True, ok, ort.__version__, detail, None if ok else gpu_hint,
                         round(time.perf_counter() - start, 3)))
    return out


def probe_tensorrt(plat: Platform) -> list[Probe]:
    """Import TensorRT, build a one-layer engine and run it on the GPU through the CUDA driver."""
    hint = HINTS[f"tensorrt:{_where(plat)}"] if plat.has_gpu else None  # no GPU: nothing to install
    try:
        import tensorrt as trt
    except ImportError as exc:
        return [Probe("tensorrt", False, False, detail=f"not importable ({exc})"
                      + ("" if plat.has_gpu else "; it needs an NVIDIA GPU anyway"), hint=hint)]
    from .tensorrt import MIN_TENSORRT, describe_tensorrt, tensorrt_version

    version = trt.__version__
    if tensorrt_version(version) < MIN_TENSORRT:
        return [Probe("tensorrt", True, False, version, f"{describe_tensorrt(version)}; edgelmm's engines need "
                      "TensorRT 10.3 or newer", hint)]
    if not plat.has_gpu:
        return [Probe("tensorrt", True, False, version, "importable, but this machine has no NVIDIA GPU")]
    from .tensorrt import run_probe_engine

    probe = _run_probe("tensorrt", version, run_probe_engine, hint)
    probe.detail = f"{describe_tensorrt(version)}; {probe.detail}" if probe.detail else describe_tensorrt(version)
    return [probe]


def probe_llamacpp(plat: Platform) -> list[Probe]:
    try:
        import llama_cpp
    except ImportError as exc:
        return [Probe("llamacpp", False, False, detail=str(exc), hint=HINTS["llamacpp"])]
    from .llamacpp import run_probe_model

    version = getattr(llama_cpp, "__version__", None)
    cpu = _run_probe("llamacpp", version, lambda: run_probe_model(0), HINTS["llamacpp"])
    offload = bool(llama_cpp.llama_supports_gpu_offload())
    if offload and plat.has_gpu:
        gpu = _run_probe("llamacpp:gpu-offload", version, lambda: run_probe_model(99), HINTS["llamacpp-gpu"])
    elif offload:
        gpu = Probe("llamacpp:gpu-offload", True, False, version, "built with a GPU backend, but no NVIDIA GPU here")
    else:
        gpu = Probe("llamacpp:gpu-offload", True, False, version, "this build has no GPU backend (CPU only)",
                    HINTS["llamacpp-gpu"] if plat.has_gpu else None)
    return [cpu, gpu]


def _run_probe(name: str, version: str | None, run, hint: str | None) -> Probe:
    start = time.perf_counter()
    try:
        ok, detail = run()
    except Exception as exc:  # a broken native library raises its own types
        ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return Probe(name, True, ok, version, detail, None if ok else hint, round(time.perf_counter() - start, 3))


def probe_torch(plat: Platform) -> list[Probe]:
    try:
        import torch
    except ImportError as exc:
        return [Probe("torch", False, False, detail=f"{exc} (only the export side needs it)",
                      hint="pip install 'edgelmm[export]'")]
    out = [Probe("torch", True, True, torch.__version__, "CPU (the PyTorch reference)")]
    if not torch.cuda.is_available():
        built = torch.version.cuda
        out.append(Probe("torch:cuda", True, False, torch.__version__,
                         f"torch built with CUDA {built}, but no GPU answers" if built else "a CPU-only build of torch",
                         HINTS["torch-cuda"] if plat.has_gpu else None))
        return out
    try:
        a = torch.ones(64, 64, device="cuda")
        ok = float((a @ a).sum().item()) == 64.0 ** 3
        detail = f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
    except Exception as exc:  # a driver/toolkit mismatch raises from inside torch
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    out.append(Probe("torch:cuda", True, ok, torch.__version__, detail, None if ok else HINTS["torch-cuda"]))
    return out


def probe_opencv() -> Probe:
    """For `edgelmm watch`: a Jetson CSI camera needs OpenCV built with GStreamer (JetPack's is)."""
    try:
        import cv2
    except ImportError as exc:
        return Probe("opencv", False, False, detail=str(exc), hint="pip install 'edgelmm[watch]'")
    info = cv2.getBuildInformation()
    gst = re.search(r"GStreamer:\s*(\w+)", info)
    has_gst = bool(gst and gst.group(1).upper() == "YES")
    return Probe("opencv", True, True, cv2.__version__,
                 "GStreamer: " + ("yes (CSI cameras through nvarguscamerasrc work)" if has_gst else
                                  "no (cameras by index, files and URLs only; JetPack's python3-opencv has it)"))


@lru_cache(maxsize=1)
def this_platform() -> Platform:
    """`detect_platform()` of this machine, once per process."""
    return detect_platform()


# Probed for `doctor` beside the backends (registry.BACKENDS): what exports and what watch reads video with.
OTHER_PROBES = {"torch": lambda plat: probe_torch(plat), "opencv": lambda plat: [probe_opencv()]}


@lru_cache(maxsize=None)
def _probe_group(group: str) -> tuple[Probe, ...]:
    from .registry import BACKENDS, run_probes

    plat = this_platform()
    if group in BACKENDS:
        return tuple(run_probes(BACKENDS[group], plat))
    return tuple(OTHER_PROBES[group](plat))


def probe(name: str) -> Probe:
    """One probe by name ("onnxruntime:CUDAExecutionProvider", "tensorrt", "llamacpp:gpu-offload" ...).
    Each group of probes runs once per process, when first asked for (the TensorRT ones build an
    engine: seconds), so `backend="auto"` on a CPU host probes nothing on the GPU."""
    return next(p for p in _probe_group(name.split(":")[0]) if p.name == name)


def probe_all() -> tuple[Platform, tuple[Probe, ...]]:
    """This machine and every probe (for `doctor`)."""
    from .registry import BACKENDS

    groups = (*BACKENDS, *OTHER_PROBES)
    return this_platform(), tuple(p for g in groups for p in _probe_group(g))


# --- the fallback chain for one bundle ------------------------------------------------------------

@dataclass
class Candidate:
    backend: str                  # tensorrt | onnxruntime | llamacpp
    provider: str | None          # onnxruntime: tensorrt | cuda | cpu; llamacpp: gpu | cpu
    precision: str | None
    usable: bool
    reason: str

    def label(self) -> str:
        return self.backend + (f"/{self.provider}" if self.provider else "") + (f" {self.precision}" if self.precision else "")


def iter_plan(bundle, plat: Platform | None = None, probe_fn=None, engine_target: dict | None = None):
    """The backends that could run `bundle` here, best first, each probed only when reached (so a
    caller that stops at the first usable one probes no more). A GPU candidate is only probed on a
    machine with an NVIDIA GPU. `probe_fn(name) -> Probe` (default `probe`) and `engine_target` (this machine's GPU and
    TensorRT, see `tensorrt.current_engine_target()`) are replaceable, to test the ordering for other machines."""
    from .registry import BACKENDS

    plat = plat or this_platform()
    probe_fn = probe_fn or probe
    formats = bundle.formats()

    def candidate(backend, provider, precision, needs_gpu, probe_name, missing=None):
        if missing:
            return Candidate(backend, provider, precision, False, missing)
        if needs_gpu and not plat.has_gpu:
            return Candidate(backend, provider, precision, False, "no NVIDIA GPU on this machine")
        p = probe_fn(probe_name)
        return Candidate(backend, provider, precision, p.runs, p.detail + (f"; {p.hint}" if p.hint and not p.runs else ""))

    # The registry's steps, every GPU one first: TensorRT engines built for this GPU, ONNX Runtime on
    # the GPU (TensorRT provider, then CUDA), llama.cpp with GPU offload; then the CPU ones.
    for on_gpu in (True, False):
        for spec in BACKENDS.values():
            for step in (s for s in spec.plan if s.needs_gpu == on_gpu):
                if spec.format not in formats:
                    yield candidate(spec.name, step.provider, None, step.needs_gpu, step.probe,
                                    f"the bundle has no {spec.artifacts} ({spec.how_to_get})")
                elif spec.name == "tensorrt":  # engines are for one GPU and TensorRT version
                    precision = _best(bundle.precisions("tensorrt"), spec.preference)
                    mismatch = (engine_mismatch(bundle, precision, engine_target)
                                if plat.has_gpu and probe_fn(step.probe).runs else None)
                    yield candidate(spec.name, step.provider, precision, step.needs_gpu, step.probe, mismatch)
                else:
                    yield candidate(spec.name, step.provider, None, step.needs_gpu, step.probe)


def plan(bundle, plat: Platform | None = None, probe_fn=None, engine_target: dict | None = None) -> list[Candidate]:
    """Every candidate of `iter_plan`, each probed (for `doctor`)."""
    return list(iter_plan(bundle, plat, probe_fn, engine_target))


def _best(have: list[str], order: tuple[str, ...]) -> str | None:
    return next((p for p in order if p in have), have[0] if have else None)


def choose(bundle, plat: Platform | None = None, probe_fn=None,
           engine_target: dict | None = None) -> tuple[Candidate, list[Candidate]]:
    """The first usable candidate, and the candidates passed over before it (for describe() and the
    log); those after it are not probed."""
    chain = []
    for cand in iter_plan(bundle, plat, probe_fn, engine_target):
        chain.append(cand)
        if cand.usable:
            log.info("backend auto -> %s (%s); passed over: %s", cand.label(), cand.reason,
                     "; ".join(f"{c.label()}: {c.reason}" for c in chain[:chain.index(cand)]) or "none")
            return cand, chain
    raise BackendUnavailable("no backend can run this bundle here: " +
                             "; ".join(f"{c.label()}: {c.reason}" for c in chain))




def engine_mismatch(bundle, precision: str | None, here: dict[str, Any] | None = None) -> str | None:
    if precision is None:
        return "no engines"
    here = here or current_engine_target()
    for art in bundle.artifacts(format="tensorrt", precision=precision):
        why = engine_incompatibility(art["engine"]["target"], here)
        if why:
            return f"engines do not fit this machine: {why}; run `edgelmm build-engines {bundle.root}` here"
    return None
