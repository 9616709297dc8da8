"""edgelmm at real model sizes (issue 22): export, calibrate and run random-weight checkpoints that
have the real architecture dimensions of SmolVLM-256M, SmolVLM-500M, a Mantis-style LLaVA with
SigLIP-so400m + Llama-3.2-1B, and the same with Llama-3.2-3B (`edgelmm/testing/scale_checkpoints.py`
builds them, bf16 safetensors, cached under --workdir). Every step is the CLI a user would type,
in its own process under `/usr/bin/time -v`: wall time, peak RSS, exit status, the tail of stderr
on failure, and for `run` the decode tokens/s from `--json`; plus the bundle's size on disk per
format and precision.

    .venv/bin/python benchmarks/scale.py --dry-run                         # the commands, nothing run
    nice -n 10 .venv/bin/python benchmarks/scale.py --models smolvlm-256m --steps export
    nice -n 10 .venv/bin/python benchmarks/scale.py [--models smolvlm-256m,smolvlm-500m,mantis-1b,3b]
        [--steps export,calibrate,run] [--workdir /tmp/edgelmm-scale] [--timeout 4h] [--max-memory 16G]
        [--max-new-tokens 16] [--threads N] [--export-args "--no-imatrix"] [--calibrate-args "..."]
    .venv/bin/python benchmarks/scale.py --table                            # the README table from the JSON

It is NOT part of `make test`: at these sizes one model takes from minutes (smolvlm-256m) to hours
(3b) on a small machine, and needs disk (3b: ~7 GB checkpoint, ~17 GB bundle) and memory (the
export loads the model in fp32: 3b ~15 GB). Run one model at a time on a shared machine. Results
merge by model into benchmarks/results/scale.json (so runs of different models accumulate; a
step run again replaces that step's record), with the machine (cores, RAM, load average at the
start) of each run; logs of every step go to WORKDIR/logs/.

Steps: `export` (`edgelmm export CKPT OUT --format onnx,gguf --gguf-types q4_k_m`, verified against
PyTorch as by default; an existing bundle at OUT is removed first), `calibrate` (`edgelmm calibrate
OUT --precision int8-vision+int4`), `run` (a fixed two-image prompt, --max-new-tokens greedy tokens,
through ONNX Runtime fp32, ONNX Runtime's INT4 precision when calibrate added one, and llama.cpp
q4_k_m). `edgelmm run` picks a precision itself; when the one wanted is not what it would pick and
the CLI has no --precision, that run goes through `edgelmm.load(..., precision=...)` in a child
process instead (recorded as "via": "api"). Peak RSS is the largest single process of the step's
process tree (what `time -v` reports); the sampled sum over the tree is recorded too
(peak_tree_rss_sampled_bytes) and the table shows the larger. `--max-memory` is passed to export
and calibrate only if their --help lists it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_MODELS = ["smolvlm-256m", "smolvlm-500m", "mantis-1b", "3b"]
# Tiny checkpoints of checkpoints.py: a quick smoke test of this script (not in the default set).
TINY_MODELS = {"tiny-smolvlm": "idefics3", "tiny-llava": "llava-siglip"}
STEPS = ["export", "calibrate", "run"]
PROMPT = "What changed between <image> and <image>?"
GGUF_TYPE = "q4_k_m"
CALIB_PRECISION = "int8-vision+int4"
INT4_PRECISIONS = ("int8-vision+int4", "int4")  # ONNX precisions with the INT4 decoder, preferred first
RESULTS = REPO / "benchmarks" / "results" / "scale.json"
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
GiB = 1 << 30


def now() -> str:
    return dt.datetime.now().strftime("%H:%M:%S")


def say(msg: str) -> None:
    print(f"[{now()}] {msg}", flush=True)


def fmt_s(s: float | None) -> str:
    if s is None:
        return ""
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def fmt_bytes(b: int | None) -> str:
    if not b:
        return ""
    if b >= GiB / 4:
        return f"{b / GiB:.2f} GiB"
    return f"{b / (1 << 20):.0f} MiB" if b >= 1 << 20 else f"{b / 1024:.0f} KiB"


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([smh]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 900, 90m, 4h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


# ------------------------------------------------------------------------------ the machine

def machine() -> dict:
    mem = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, v = line.split(":", 1)
            if k in ("MemTotal", "MemAvailable", "SwapTotal"):
                mem[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name")) or cpu
    except (OSError, StopIteration):
        pass
    versions = {}
    from importlib import metadata
    for pkg in ("edgelmm", "torch", "transformers", "onnxruntime", "onnxruntime-gpu", "onnx", "llama_cpp_python"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    git = {}
    try:
        git["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                       timeout=10).stdout.strip()
        git["dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                           capture_output=True, text=True, timeout=30).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"host": platform.node(), "platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "ram_bytes": mem.get("MemTotal"), "ram_available_bytes": mem.get("MemAvailable"),
            "swap_bytes": mem.get("SwapTotal"), "load_average": [round(x, 2) for x in os.getloadavg()],
            "gpu": bool(shutil.which("nvidia-smi")), "python": platform.python_version(), "versions": versions,
            "git": git, "time_v": time_v_available(), "started": dt.datetime.now().isoformat(timespec="seconds")}


# ------------------------------------------------------------------------------ measuring a step

_TIME_V: bool | None = None


def time_v_available() -> bool:
    """GNU time with -v and -o (busybox and BSD time lack them)."""
    global _TIME_V
    if _TIME_V is None:
        try:
            r = subprocess.run(["/usr/bin/time", "-v", "-o", "/dev/null", "true"], capture_output=True, timeout=10)
            _TIME_V = r.returncode == 0
        except (OSError, subprocess.SubprocessError):
            _TIME_V = False
    return _TIME_V


def parse_time_v(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        k, _, v = line.strip().rpartition(": ")
        if k == "Maximum resident set size (kbytes)":
            out["peak_rss_bytes"] = int(v) * 1024
        elif k == "Exit status":
            out["exit"] = int(v)
        elif k.startswith("Elapsed (wall clock) time"):
            parts = [float(x) for x in v.split(":")]
            out["wall_s_time_v"] = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
        elif k == "User time (seconds)":
            out["user_s"] = float(v)
        elif k == "System time (seconds)":
            out["sys_s"] = float(v)
        elif line.strip().startswith("Command terminated by signal"):
            out["signal"] = int(line.split()[-1])
    return out


def rusage_wrapper(argv: list[str]) -> int:
    """`scale.py --_rusage OUT -- CMD...`: run CMD as this fresh process's only child and write its
    exit status and peak RSS. RUSAGE_CHILDREN's ru_maxrss is the largest over every child this
    process ever waited for, so it is exactly CMD's only because this wrapper is new per step."""
    out, cmd = argv[0], argv[2:]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd)
    try:
        rc = p.wait()
    except KeyboardInterrupt:
        p.terminate()
        rc = p.wait()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    Path(out).write_text(json.dumps({"peak_rss_bytes": ru.ru_maxrss * 1024, "exit": rc, "user_s": ru.ru_utime,
                                     "sys_s": ru.ru_stime, "wall_s_time_v": time.perf_counter() - t0}))
    return rc if rc >= 0 else 128 - rc


def tree_rss(root: int) -> int:
    """Current resident bytes of `root` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2:].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    total, todo, page = 0, [root], os.sysconf("SC_PAGE_SIZE")
    while todo:
        pid = todo.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            pass
        todo.extend(children.get(pid, []))
    return total


def measure(cmd: list[str], label: str, log_base: Path, timeout: float | None, heartbeat: float) -> dict:
    """Run cmd in its own session under /usr/bin/time -v (or the rusage wrapper), streaming its
    stdout/stderr to log files, with a progress line every `heartbeat` seconds; kill the whole
    process group at the timeout. Returns the step record."""
    log_base.parent.mkdir(parents=True, exist_ok=True)
    # (names carry dots, "run.onnxruntime.int8-vision+int4": append, never with_suffix)
    out_log, err_log, time_file = (Path(f"{log_base}.{ext}") for ext in ("stdout", "stderr", "time"))
    time_file.unlink(missing_ok=True)
    if time_v_available():
        full = ["/usr/bin/time", "-v", "-o", str(time_file), *cmd]
    else:
        full = [sys.executable, str(Path(__file__).resolve()), "--_rusage", str(time_file), "--", *cmd]
    say(f"{label}: start  $ {shlex.join(cmd)}")
    env = {**os.environ, **CHILD_ENV}
    t0 = time.perf_counter()
    peak_tree, timed_out = 0, False
    with open(out_log, "wb") as fo, open(err_log, "wb") as fe:
        proc = subprocess.Popen(full, stdout=fo, stderr=fe, env=env, start_new_session=True, cwd=REPO)
        next_beat = t0 + heartbeat
        try:
            while True:
                try:
                    proc.wait(timeout=2.0)
                    break
                except subprocess.TimeoutExpired:
                    pass
                rss = tree_rss(proc.pid)
                peak_tree = max(peak_tree, rss)
                elapsed = time.perf_counter() - t0
                if timeout and elapsed > timeout:
                    timed_out = True
                    say(f"{label}: timeout after {fmt_s(elapsed)}; stopping it")
                    _kill_group(proc)
                    break
                if time.perf_counter() >= next_beat:
                    last = _tail(err_log, 1) or _tail(out_log, 1)
                    say(f"{label}: running {fmt_s(elapsed)}, RSS now {fmt_bytes(rss)} (tree peak {fmt_bytes(peak_tree)})"
                        + (f"; last: {last[:120]}" if last else ""))
                    next_beat += heartbeat
        except KeyboardInterrupt:
            say(f"{label}: interrupted; stopping it")
            _kill_group(proc)
            raise
    wall = time.perf_counter() - t0
    rec = {"command": shlex.join(cmd), "wall_s": round(wall, 2), "peak_tree_rss_sampled_bytes": peak_tree,
           "log": str(log_base)}
    try:
        tv = time_file.read_text()
        rec.update(parse_time_v(tv) if time_v_available() else json.loads(tv))
    except (OSError, ValueError):
        pass
    rec.setdefault("exit", proc.returncode)
    if timed_out:
        rec["status"] = "timeout"
    elif rec["exit"] == 0:
        rec["status"] = "ok"
    else:
        rec["status"] = f"failed (exit {rec['exit']})"
    if rec["status"] != "ok":
        rec["stderr_tail"] = _tail(err_log, 40)
    peak = max(rec.get("peak_rss_bytes") or 0, peak_tree)
    say(f"{label}: {rec['status']} in {fmt_s(wall)}, peak RSS {fmt_bytes(peak)}")
    if rec["status"] != "ok":
        for line in rec["stderr_tail"].splitlines()[-12:]:
            print(f"    | {line}", flush=True)
    return rec


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    # progress bars redraw with \r: keep what the line ended as
    rows = [r.rsplit("\r", 1)[-1] for r in text.splitlines()]
    rows = [r for r in rows if r.strip()]
    # progress bars ("Loading weights:  91%|...") say nothing about a failure: keep only the last one
    bars = [i for i, r in enumerate(rows) if re.search(r"\d+%\|", r)]
    rows = [r for i, r in enumerate(rows) if i not in bars[:-1]]
    return "\n".join(rows[-lines:])


# ------------------------------------------------------------------------------ the CLI and bundles

_HELP: dict[str, str] = {}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgelmm.cli", *args]


def cli_help(command: str) -> str:
    if command not in _HELP:
        r = subprocess.run(cli(command, "--help"), capture_output=True, text=True, timeout=120, cwd=REPO,
                           env={**os.environ, **CHILD_ENV, "COLUMNS": "240", "NO_COLOR": "1", "TERM": "dumb"})
        _HELP[command] = r.stdout + r.stderr
    return _HELP[command]


def cli_has(command: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", cli_help(command)) is not None


def manifest(bundle: Path) -> dict | None:
    try:
        return json.loads((bundle / "edgelmm.json").read_text())
    except (OSError, ValueError):
        return None


def precisions(man: dict | None, fmt: str) -> list[str]:
    return sorted({a["precision"] for a in (man or {}).get("artifacts", []) if a.get("format") == fmt})


def disk_usage(bundle: Path, man: dict | None) -> dict:
    """Bytes on disk: the whole bundle, per format, and per (format, precision) from the manifest's
    file lists (a file two artifacts share counts once in each total)."""
    total = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) if bundle.is_dir() else 0
    per: dict[str, dict[str, int]] = {}
    seen_fmt: dict[str, set] = {}
    seen_prec: dict[tuple, set] = {}
    for a in (man or {}).get("artifacts", []):
        fmt, prec = a.get("format", "?"), a.get("precision", "?")
        for f in a.get("files", []):
            if f["file"] not in seen_prec.setdefault((fmt, prec), set()):
                seen_prec[(fmt, prec)].add(f["file"])
                per.setdefault(fmt, {}).setdefault(prec, 0)
                per[fmt][prec] += int(f.get("size", 0))
            seen_fmt.setdefault(fmt, set()).add((f["file"], int(f.get("size", 0))))
    return {"total_bytes": total, "by_format_bytes": {k: sum(s for _, s in v) for k, v in seen_fmt.items()},
            "by_precision_bytes": per}


def count_parameters(ckpt: Path) -> int | None:
    """Parameters in a checkpoint's safetensors files, from their headers (no torch)."""
    n = 0
    files = list(ckpt.glob("*.safetensors"))
    if not files:
        return None
    for f in files:
        with open(f, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for k, v in header.items():
            if k != "__metadata__":
                prod = 1
                for d in v["shape"]:
                    prod *= d
                n += prod
    return n


def write_images(workdir: Path, hw: tuple[int, int]) -> list[Path]:
    """Two structured RGB frames of the given size (the same files every run)."""
    import numpy as np
    from PIL import Image

    from edgelmm.images import sample_images

    d = workdir / "images"
    d.mkdir(parents=True, exist_ok=True)
    paths = [d / f"frame{i}_{hw[0]}x{hw[1]}.png" for i in range(2)]
    if not all(p.exists() for p in paths):
        for p, img in zip(paths, sample_images(2, seed=22, sizes=[hw, hw])):
            Image.fromarray(np.asarray(img)).save(p)
    return paths


# ------------------------------------------------------------------------------ results

def load_results(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            return data
    except (OSError, ValueError):
        pass
    return {"schema": 1, "models": {}}


def save_results(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def step_order(name: str) -> tuple:
    """build, export, calibrate, then runs: ONNX Runtime fp32, its other precisions, llama.cpp."""
    parts = name.split(" ")
    order = {"build": 0, "export": 1, "calibrate": 2, "run": 3}
    run_rank = 0 if parts[1:] == ["onnxruntime", "fp32"] else 1 if parts[1:2] == ["onnxruntime"] else 2
    return (order.get(parts[0], 9), run_rank if parts[0] == "run" else 0, name)


def render_table(data: dict) -> str:
    rows = ["| model | params | step | wall | peak RSS GiB | disk | tok/s | status |",
            "|---|---|---|---|---|---|---|---|"]
    for key, m in data.get("models", {}).items():
        params = m.get("params")
        ptxt = "" if not params else f"{params / 1e9:.2f}B" if params >= 1e9 else \
            f"{params / 1e6:.0f}M" if params >= 1e7 else f"{params / 1e6:.2f}M"
        for name in sorted(m.get("steps", {}), key=step_order):
            s = m["steps"][name]
            peak = max(s.get("peak_rss_bytes") or 0, s.get("peak_tree_rss_sampled_bytes") or 0)
            tok = s.get("decode_tokens_per_s")
            cells = [key, ptxt, name, fmt_s(s.get("wall_s")), f"{peak / GiB:.2f}" if peak else "",
                     fmt_bytes(s.get("disk_bytes")), "" if tok is None else f"{tok:.1f}", s.get("status", "")]
            rows.append("| " + " | ".join(cells) + " |")
    machines = {json.dumps({k: m.get("machine", {}).get(k) for k in ("cpu", "cores", "ram_bytes")}, sort_keys=True)
                for m in data.get("models", {}).values()}
    notes = []
    for mj in sorted(machines):
        mm = json.loads(mj)
        if mm.get("cores"):
            notes.append(f"{mm['cores']} cores ({mm.get('cpu') or '?'}), "
                         f"{(mm.get('ram_bytes') or 0) / GiB:.0f} GiB RAM")
    if notes:
        rows.append("")
        rows.append("Machine: " + "; ".join(notes) + ". Random weights with the real dimensions "
                    "(`edgelmm/testing/scale_checkpoints.py`); `python benchmarks/scale.py` writes "
                    "`benchmarks/results/scale.json`.")
    return "\n".join(rows)


# ------------------------------------------------------------------------------ the steps

def checkpoint_for(key: str, workdir: Path) -> Path:
    if key in TINY_MODELS:
        from edgelmm.testing.checkpoints import CHECKPOINT_NAMES
        return workdir / "tiny" / CHECKPOINT_NAMES[TINY_MODELS[key]]
    from edgelmm.testing.scale_checkpoints import checkpoint_dir
    return checkpoint_dir(key, workdir)


def checkpoint_ready(key: str, ckpt: Path) -> bool:
    if key in TINY_MODELS:
        return (ckpt / "config.json").exists()
    from edgelmm.testing.scale_checkpoints import MARKER, spec
    try:
        info = json.loads((ckpt / MARKER).read_text())
    except (OSError, ValueError):
        return False
    # the builder's defaults (seed 0, bf16, std 0.02) are what this script builds with
    return info.get("recipe_hash") == spec(key).recipe_hash(0, "bfloat16", 0.02)


def build_command(key: str, workdir: Path) -> list[str]:
    if key in TINY_MODELS:
        code = ("import sys; from edgelmm.testing.checkpoints import build_tiny_checkpoint; "
                f"print(build_tiny_checkpoint({TINY_MODELS[key]!r}, sys.argv[1]))")
        return [sys.executable, "-c", code, str(workdir / "tiny")]
    return [sys.executable, "-m", "edgelmm.testing.scale_checkpoints", "build", key, "--workdir", str(workdir)]


def export_command(ckpt: Path, bundle: Path, args) -> list[str]:
    cmd = cli("export", str(ckpt), str(bundle), "--format", "onnx,gguf", "--gguf-types", GGUF_TYPE)
    if args.max_memory and cli_has("export", "--max-memory"):
        cmd += ["--max-memory", args.max_memory]
    return cmd + shlex.split(args.export_args or "")


def calibrate_command(bundle: Path, args, overwrite: bool) -> list[str]:
    cmd = cli("calibrate", str(bundle), "--precision", CALIB_PRECISION)
    if overwrite:
        cmd.append("--overwrite")
    if args.max_memory and cli_has("calibrate", "--max-memory"):
        cmd += ["--max-memory", args.max_memory]
    return cmd + shlex.split(args.calibrate_args or "")


def auto_precision(backend: str, have: list[str]) -> str | None:
    """What `edgelmm run --backend B` picks on a CPU without --precision (edgelmm.api's order)."""
    try:
        from edgelmm import api
        order = api.ORT_CPU_PREFERENCE if backend == "onnxruntime" else api.GGUF_PREFERENCE
    except (ImportError, AttributeError):
        order = ("int8-vision+int4", "int4", "int8", "fp32") if backend == "onnxruntime" else \
            ("q4_k_m", "q8_0", "f16", "f32")
    return next((p for p in order if p in have), None)


def run_command(bundle: Path, backend: str, precision: str, have: list[str], images: list[Path],
                args) -> tuple[list[str], str]:
    """(command, via): the CLI when it can be made to run this precision, else the API driver."""
    common = ["-p", PROMPT, *[x for img in images for x in ("-i", str(img))],
              "--max-new-tokens", str(args.max_new_tokens), "--json"]
    if args.threads:
        common += ["--threads", str(args.threads)]
    if cli_has("run", "--precision"):
        return cli("run", str(bundle), "--backend", backend, "--precision", precision, *common), "cli"
    if auto_precision(backend, have) == precision:
        return cli("run", str(bundle), "--backend", backend, *common), "cli"
    driver = [sys.executable, str(Path(__file__).resolve()), "--_api-run", str(bundle), backend, precision,
              str(args.max_new_tokens), str(args.threads or 0), PROMPT, *map(str, images)]
    return driver, "api"


def api_run(argv: list[str]) -> int:
    """`scale.py --_api-run BUNDLE BACKEND PRECISION MAX_NEW THREADS PROMPT IMAGE...`: what
    `edgelmm run --json` prints, through edgelmm.load(..., precision=...)."""
    bundle, backend, precision, max_new, threads, prompt, *images = argv
    import edgelmm

    pipe = edgelmm.load(bundle, backend=backend, precision=precision, threads=int(threads) or None)
    g = pipe.generate(prompt, images, max_new_tokens=int(max_new))
    print(json.dumps({"answer": g.text, "token_ids": g.token_ids, "prompt_tokens": g.prompt_tokens,
                      "finish_reason": g.finish_reason, "timings_ms": g.timings_ms, "backend": pipe.describe()},
                     default=str))
    return 0


def parse_run_output(rec: dict, want_precision: str) -> None:
    try:
        lines = Path(rec["log"] + ".stdout").read_text().splitlines()
        out = json.loads(next(line for line in reversed(lines) if line.startswith("{")))
    except (OSError, ValueError, StopIteration):
        if rec["status"] == "ok":
            rec["status"] = "ok (no JSON output)"
        return
    if "error" in out:
        rec["error"] = f"{out['error']}: {out.get('message', '')}"[:500]
        return
    t = out.get("timings_ms", {})
    n = len(out.get("token_ids", []))
    backend = out.get("backend", {})
    rec.update({"prompt_tokens": out.get("prompt_tokens"), "new_tokens": n, "finish_reason": out.get("finish_reason"),
                "timings_ms": t, "ran_precision": backend.get("precision"),
                "backend": {k: v for k, v in backend.items() if k != "selection"},
                "answer": out.get("answer", "")[:200]})
    if n > 1 and t.get("decode_ms"):
        rec["decode_tokens_per_s"] = round((n - 1) / (t["decode_ms"] / 1e3), 2)
    if out.get("prompt_tokens") and t.get("prefill_ms"):
        rec["prefill_tokens_per_s"] = round(out["prompt_tokens"] / (t["prefill_ms"] / 1e3), 2)
    if backend.get("precision") and backend["precision"] != want_precision and rec["status"] == "ok":
        rec["status"] = f"ran {backend['precision']}, not {want_precision}"


def bench_model(key: str, args, results: dict, images: list[Path], mach: dict) -> None:
    workdir: Path = args.workdir
    ckpt = checkpoint_for(key, workdir)
    bundle = workdir / "bundles" / key
    logs = workdir / "logs"
    entry = results["models"].setdefault(key, {})
    entry.update({"checkpoint": str(ckpt), "bundle": str(bundle), "machine": mach,
                  "prompt": PROMPT, "images": [str(p) for p in images], "max_new_tokens": args.max_new_tokens})
    steps = entry.setdefault("steps", {})
    if key not in TINY_MODELS:
        from edgelmm.testing.scale_checkpoints import spec
        entry["real"] = spec(key).real

    def record(name: str, rec: dict) -> None:
        rec["finished"] = dt.datetime.now().isoformat(timespec="seconds")
        steps[name] = rec
        save_results(args.results, results)

    label = f"{key} |"
    if args.dry_run:
        size = ""
        if key not in TINY_MODELS:
            from edgelmm.testing.scale_checkpoints import parameter_count
            p = parameter_count(key)
            size = f"{p['total'] / 1e6:.1f}M parameters ({p['vision'] / 1e6:.1f}M vision+projector), "
        print(f"\n## {key}  ({size}checkpoint {ckpt}, bundle {bundle})")
    # build (when needed by export, or missing)
    if not checkpoint_ready(key, ckpt):
        cmd = build_command(key, workdir)
        if args.dry_run:
            print("build:     " + (shlex.join(cmd) if "export" in args.steps else "(not built: export is not in --steps)"))
        elif "export" in args.steps:
            rec = measure(cmd, f"{label} build", logs / f"{key}.build", args.timeout, args.heartbeat)
            if rec["status"] == "ok":
                rec["disk_bytes"] = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
            record("build", rec)
            if rec["status"] != "ok":
                return
    elif args.dry_run:
        print(f"build:     (cached: {ckpt})")
    if not args.dry_run:
        entry["params"] = count_parameters(ckpt) if ckpt.exists() else entry.get("params")
        entry["checkpoint_bytes"] = sum(p.stat().st_size for p in ckpt.glob("*.safetensors")) if ckpt.exists() else None

    # export
    if "export" in args.steps:
        cmd = export_command(ckpt, bundle, args)
        if args.max_memory and not cli_has("export", "--max-memory"):
            entry["max_memory_ignored"] = "edgelmm export has no --max-memory"
        if args.dry_run:
            print("export:    " + shlex.join(cmd))
        else:
            if bundle.exists():
                say(f"{label} export: removing the old bundle {bundle}")
                shutil.rmtree(bundle)
            for name in [n for n in steps if n.startswith(("calibrate", "run"))]:
                steps.pop(name)  # measured on the old bundle
            rec = measure(cmd, f"{label} export", logs / f"{key}.export", args.timeout, args.heartbeat)
            man = manifest(bundle)
            if man:
                rec["disk"] = disk_usage(bundle, man)
                rec["disk_bytes"] = rec["disk"]["total_bytes"]
                rec["verify"] = {p: ({"passed": v.get("passed"), "summary": v.get("summary")} if isinstance(v, dict)
                                     else v) for p, v in (man.get("verify") or {}).items()}
                if any(isinstance(v, dict) and v.get("passed") is False for v in rec["verify"].values()) \
                        and rec["status"] == "ok":
                    rec["status"] = "ok (verify failed)"
            else:
                leftovers = list(bundle.parent.glob(f".{bundle.name}*"))  # a killed export's temporary dirs
                for d in leftovers:
                    shutil.rmtree(d, ignore_errors=True)
                if leftovers:
                    say(f"{label} export: removed {len(leftovers)} partial director(ies) it left")
            record("export", rec)

    # calibrate
    if "calibrate" in args.steps:
        man = manifest(bundle)
        cmd = calibrate_command(bundle, args, overwrite=CALIB_PRECISION in precisions(man, "onnx"))
        if args.dry_run:
            print("calibrate: " + shlex.join(cmd))
        elif not man:
            record("calibrate", {"status": "skipped: no bundle", "command": shlex.join(cmd)})
        else:
            before = disk_usage(bundle, man)
            rec = measure(cmd, f"{label} calibrate", logs / f"{key}.calibrate", args.timeout, args.heartbeat)
            after_man = manifest(bundle)
            rec["disk"] = disk_usage(bundle, after_man)
            # the files the calibrated precision loads (its embedding graph is shared with fp32)
            rec["disk_bytes"] = rec["disk"]["by_precision_bytes"].get("onnx", {}).get(CALIB_PRECISION) or \
                rec["disk"]["total_bytes"] - before["total_bytes"]
            rec["onnx_precisions"] = precisions(after_man, "onnx")
            record("calibrate", rec)

    # run
    if "run" in args.steps:
        man = manifest(bundle)
        onnx, gguf = precisions(man, "onnx"), precisions(man, "gguf")
        if args.dry_run and "export" in args.steps:  # what export (+ calibrate) will leave
            onnx = ["fp32"] + ([CALIB_PRECISION] if "calibrate" in args.steps or CALIB_PRECISION in onnx else [])
            gguf = [GGUF_TYPE]
        int4 = next((p for p in INT4_PRECISIONS if p in onnx), None)
        targets = [("onnxruntime", "fp32", "fp32" in onnx), ("onnxruntime", int4 or "int4", bool(int4)),
                   ("llamacpp", GGUF_TYPE, GGUF_TYPE in gguf)]
        for backend, prec, present in targets:
            name = f"run {backend} {prec}"
            if args.dry_run and not man and "export" not in args.steps:
                print(f"run:       ({name}: no bundle, skipped)")
                continue
            if args.dry_run:
                cmd, via = run_command(bundle, backend, prec, onnx if backend == "onnxruntime" else gguf, images, args)
                print(f"run:       {shlex.join(cmd)}  [{via}]" if present else
                      f"run:       ({name}: not in the bundle, skipped)")
                continue
            if not man:
                record(name, {"status": "skipped: no bundle"})
                continue
            if not present:
                if backend == "onnxruntime" and prec != "fp32":
                    steps.pop(name, None)  # no calibrated precision: not a row
                    say(f"{label} {name}: skipped (the bundle has no INT4 ONNX precision; run calibrate)")
                else:
                    record(name, {"status": "skipped: not in the bundle"})
                continue
            cmd, via = run_command(bundle, backend, prec, onnx if backend == "onnxruntime" else gguf, images, args)
            rec = measure(cmd, f"{label} {name}", logs / f"{key}.{name.replace(' ', '.')}", args.timeout,
                          args.heartbeat)
            rec["via"] = via
            parse_run_output(rec, prec)
            fmt = "onnx" if backend == "onnxruntime" else "gguf"
            per = disk_usage(bundle, man)["by_precision_bytes"].get(fmt, {})
            rec["disk_bytes"] = per.get(prec, 0)  # the files this precision loads (a q4_k_m LLM + its mmproj)
            if rec.get("decode_tokens_per_s") is not None:
                say(f"{label} {name}: decode {rec['decode_tokens_per_s']} tok/s, prefill "
                    f"{rec.get('prefill_tokens_per_s')} tok/s ({rec.get('prompt_tokens')} prompt tokens)")
            record(name, rec)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_rusage"]:
        return rusage_wrapper(argv[1:])
    if argv[:1] == ["--_api-run"]:
        return api_run(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS),
                    help=f"comma-separated: {', '.join(DEFAULT_MODELS)} (default: all), or {', '.join(TINY_MODELS)} "
                         "(a quick smoke test of this script)")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated: export, calibrate, run")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/edgelmm-scale"),
                    help="checkpoints, bundles, images and logs (default /tmp/edgelmm-scale)")
    ap.add_argument("--results", type=Path, default=RESULTS, help=f"the JSON to merge into (default {RESULTS})")
    ap.add_argument("--timeout", type=parse_duration, default=None, help="per step: seconds, or 90m, 4h (default none)")
    ap.add_argument("--heartbeat", type=parse_duration, default=60.0, help="seconds between progress lines (60)")
    ap.add_argument("--max-memory", default=None, help="e.g. 12G: passed to export/calibrate if their --help lists "
                                                       "--max-memory")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="passed to `edgelmm run --threads` (default: its own)")
    ap.add_argument("--image-size", default="480x640", help="HxW of the two prompt images (default 480x640)")
    ap.add_argument("--export-args", default="", help="extra `edgelmm export` arguments, e.g. \"--no-imatrix\"")
    ap.add_argument("--calibrate-args", default="", help="extra `edgelmm calibrate` arguments")
    ap.add_argument("--dry-run", action="store_true", help="print the commands; run, build and write nothing")
    ap.add_argument("--table", action="store_true", help="only print the markdown table from the results JSON")
    args = ap.parse_args(argv)

    if args.table:
        print(render_table(load_results(args.results)))
        return 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in DEFAULT_MODELS and m not in TINY_MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {DEFAULT_MODELS + list(TINY_MODELS)}")
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if any(s not in STEPS for s in args.steps):
        ap.error(f"--steps: choose from {STEPS}")
    m = re.fullmatch(r"(\d+)x(\d+)", args.image_size)
    if not m:
        ap.error("--image-size: HxW, e.g. 480x640")
    hw = (int(m.group(1)), int(m.group(2)))
    args.workdir = args.workdir.resolve()

    if args.dry_run:
        images = [args.workdir / "images" / f"frame{i}_{hw[0]}x{hw[1]}.png" for i in range(2)]
        print(f"# dry run: workdir {args.workdir}, results {args.results}, "
              f"measured with {'/usr/bin/time -v' if time_v_available() else 'the rusage wrapper'}")
        if args.max_memory:
            for c in ("export", "calibrate"):
                print(f"# --max-memory: `edgelmm {c}` {'has' if cli_has(c, '--max-memory') else 'has no'} --max-memory")
        print(f"# edgelmm run {'has' if cli_has('run', '--precision') else 'has no'} --precision")
        for key in models:
            bench_model(key, args, {"models": {}}, images, {})
        return 0

    mach = machine()
    say(f"machine: {mach['cores']} cores ({mach['cpu']}), {fmt_bytes(mach['ram_bytes'])} RAM, "
        f"{fmt_bytes(mach['ram_available_bytes'])} available, load {mach['load_average']}")
    if not mach["time_v"]:
        say("/usr/bin/time -v is not available: peak RSS from a rusage wrapper process per step")
    results = load_results(args.results)
    results["machine"] = mach
    images = write_images(args.workdir, hw)
    for key in models:
        say(f"=== {key} ===")
        bench_model(key, args, results, images, mach)
    save_results(args.results, results)
    print()
    print(render_table({"models": {k: results["models"][k] for k in models if k in results["models"]}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
