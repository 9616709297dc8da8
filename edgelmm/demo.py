"""`make demo`: the main job end to end on the embedded default model, edgelmm's trained reference
model: load it with from_pretrained, export an ONNX bundle, verify it against PyTorch, then answer
two held-out multi-image questions through ONNX Runtime (no torch on that path) and show the
expected answers next to the model's.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from PIL import Image

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
    bundle = export(model_dir, out / "bundle", overwrite=True)
    verify = json.loads((bundle / "edgelmm.json").read_text())["verify"]["fp32"]
    console.print({"verify": verify["summary"], "passed": verify["passed"]})
    pipe = api.load(bundle)
    console.print(f"[bold]backend[/]: {pipe.backend.describe()}")
    correct = 0
    for task in DEMO_TASKS:
        index = [t.name for t in synthetic.TASKS].index(task)
        sample = synthetic.make_sample("test", index)
        paths = []
        for i, arr in enumerate(sample.images):
            p = out / f"{task}-image{i + 1}.png"
            Image.fromarray(arr).save(p)
            paths.append(str(p))
        prompt = sample.messages[-1]["content"]
        console.print(f"\n[bold]prompt[/]: {prompt}\n[dim]images: {', '.join(paths)}[/]")
        g = pipe.generate(prompt, paths, max_new_tokens=16)
        ok = synthetic.normalise_answer(g.text) == synthetic.normalise_answer(sample.answer)
        correct += ok
        console.print(f"[bold]answer[/]: {g.text!r}   [dim]expected: {sample.answer!r}[/] "
                      + ("[green]right[/]" if ok else "[red]wrong[/]"))
        console.print({k: round(v, 2) for k, v in g.timings_ms.items()})
    console.print(f"\n{correct}/{len(DEMO_TASKS)} answered right; held-out accuracy per skill: `edgelmm eval`")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
