"""Load on `edgelmm serve`: throughput (requests/s, generated tokens/s) and time to first token
(p50/p95) at several concurrencies, for each thread count, with batching on (--max-batch 4) and off
(--max-batch 1). Each server is a separate `edgelmm serve` process on a loopback port; the clients
are threads here, each sending streaming requests (1-2 images, exactly `--max-tokens` tokens: ignore_eos)
back to back,
so time to first token includes the wait in the queue.

    .venv/bin/python benchmarks/serve_load.py [--bundle DIR] [--threads 1,2] [--concurrency 1,4,16]
        [--requests 32] [--max-tokens 16] [--out benchmarks/results/serve_load.json]

Without --bundle the shipped reference model is exported (ONNX fp32) into --workdir once.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def reference_bundle(workdir: Path) -> Path:
    out = workdir / "reference-bundle"
    if not (out / "edgelmm.json").exists():
        from edgelmm.export import export
        from edgelmm.models import reference_model

        export(reference_model(), out, quiet=True)
    return out


def request_bodies(n: int, max_tokens: int) -> list[bytes]:
    from PIL import Image

    from edgelmm.testing import sample_images

    bodies = []
    for i in range(n):
        images = sample_images(1 + i % 2, seed=i)
        content = [{"type": "text", "text": "Compare these: " if len(images) > 1 else "Count the shapes in "}]
        for img in images:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, "PNG")
            content.append({"type": "image_url",
                            "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}})
        bodies.append(json.dumps({"model": "m", "messages": [{"role": "user", "content": content}],
                                  "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
                                  "stream_options": {"include_usage": True}}).encode())
    return bodies


def one_request(host: str, port: int, body: bytes) -> tuple[float, float, int]:
    """(seconds to the first token, seconds in all, completion tokens) of one streaming request."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    first, tokens = None, 0
    for line in r:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter() - t0
    conn.close()
    total = time.perf_counter() - t0
    return (first if first is not None else total), total, tokens


def measure(host: str, port: int, bodies: list[bytes], concurrency: int) -> dict:
    results, lock, next_index = [], threading.Lock(), [0]

    def client():
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= len(bodies):
                return
            r = one_request(host, port, bodies[i])
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    workers = [threading.Thread(target=client) for _ in range(concurrency)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - t0
    ttft = sorted(r[0] for r in results)
    return {"requests": len(results), "seconds": round(elapsed, 3),
            "requests_per_s": round(len(results) / elapsed, 3),
            "tokens_per_s": round(sum(r[2] for r in results) / elapsed, 2),
            "ttft_p50_s": round(statistics.median(ttft), 4),
            "ttft_p95_s": round(ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))], 4)}


def start_server(bundle: Path, threads: int, max_batch: int) -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen([sys.executable, "-m", "edgelmm", "serve", str(bundle), "--port", "0", "--json",
                             "--backend", "onnxruntime", "--threads", str(threads), "--max-batch", str(max_batch),
                             "--max-queue", "256"], stdout=subprocess.PIPE, text=True)
    ready = json.loads(proc.stdout.readline())
    host, port = ready["url"].split("//")[1].split("/")[0].rsplit(":", 1)
    return proc, host, int(port)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/edgelmm-serve-load"))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_load.json"))
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or reference_bundle(args.workdir)
    bodies = request_bodies(args.requests, args.max_tokens)
    rows = []
    for threads in [int(x) for x in args.threads.split(",")]:
        for max_batch in (1, 4):
            proc, host, port = start_server(bundle, threads, max_batch)
            try:
                one_request(host, port, bodies[0])  # warm-up
                for concurrency in [int(x) for x in args.concurrency.split(",")]:
                    row = {"threads": threads, "max_batch": max_batch, "concurrency": concurrency,
                           **measure(host, port, bodies, concurrency)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                proc.terminate()
                proc.wait(60)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bundle": str(bundle), "max_tokens": args.max_tokens, "cpu_count": os.cpu_count(),
                                    "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
