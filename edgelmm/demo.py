"""`make demo`: the main job end to end on the embedded default model, edgelmm's trained reference
model: load it with from_pretrained, export a bundle (ONNX graphs and a Q4_K_M GGUF pair), verify
both against PyTorch, then answer two held-out multi-image questions through ONNX Runtime and
through llama.cpp (no torch on either path) and show the expected answers next to the models'.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

DEMO_TASKS = ("colour_of", "anomaly")


def main(out_dir: str = "demo-out") -> int:
    from rich.console import Console

    from . import api, synthetic
    from .export import export
    from .models import reference_model

    console = Console()
    out = Path(out_dir)
    out.mkdir(exist_ok=True)
    model_dir = reference_model()
    console.print(f"[bold]model[/]: {model_dir}")
    console.print(api.info(model_dir, sizes=((64, 64), (480, 640))))
    bundle = export(model_dir, out / "bundle", formats=["onnx", "gguf"], gguf_types=["q4_k_m"], overwrite=True)
    for precision, verify in json.loads((bundle / "edgelmm.json").read_text())["verify"].items():
        console.print({"verify": precision, "summary": verify["summary"], "passed": verify["passed"]})
    correct = asked = 0
    samples = {s["task"]: s for s in synthetic.write_samples(out / "samples")}
    for backend in ("onnxruntime", "llamacpp"):
        pipe = api.load(bundle, backend=backend)
        console.print(f"\n[bold]backend[/]: {pipe.backend.describe()}")
        for task in DEMO_TASKS:
            correct += ask(pipe, samples[task], console)
            asked += 1
    console.print(f"\n{correct}/{asked} answered right; held-out accuracy per skill: `edgelmm eval`. "
                  f"One question of each of the model's nine kinds: {out / 'samples'} (`edgelmm demo-images`)")
    return 0


def ask(pipe, sample: dict, console) -> bool:
    """One held-out sample (synthetic.write_samples): ask, print the answer next to the expected one."""
    from . import synthetic

    console.print(f"\n[bold]prompt[/]: {sample['prompt']}\n[dim]images: {', '.join(sample['images'])}[/]")
    g = pipe.generate(sample["messages"], sample["images"], max_new_tokens=16)
    ok = synthetic.normalise_answer(g.text) == synthetic.normalise_answer(sample["answer"])
    console.print(f"[bold]answer[/]: {g.text!r}   [dim]expected: {sample['answer']!r}[/] "
                  + ("[green]right[/]" if ok else "[red]wrong[/]"))
    console.print({k: round(v, 2) for k, v in g.timings_ms.items()})
    return ok


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
