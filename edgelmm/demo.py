"""`make demo`: the main job end to end on the embedded default model.

Until the trained reference model lands, the default is a tiny offline Mantis-style LLaVA
checkpoint built from config; its answers are random text, but every step is the real one:
from_pretrained(local dir), export to an ONNX bundle, verify against PyTorch, answer a two-image
question through ONNX Runtime.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from PIL import Image


def main(out_dir: str = "demo-out") -> int:
    from rich.console import Console

    from . import api
    from .export import export
    from .testing import build_tiny_checkpoint, sample_images

    console = Console()
    out = Path(out_dir)
    out.mkdir(exist_ok=True)
    model_dir = build_tiny_checkpoint("llava-siglip", out / "models")
    console.print(f"[bold]model[/]: {model_dir}")
    console.print(api.info(model_dir))
    paths = []
    for i, arr in enumerate(sample_images(2, seed=7)):
        p = out / f"image{i + 1}.png"
        Image.fromarray(arr).save(p)
        paths.append(str(p))
    bundle = export(model_dir, out / "bundle", overwrite=True)
    verify = json.loads((bundle / "edgelmm.json").read_text())["verify"]
    console.print({"verify": verify["summary"], "passed": verify["passed"]})
    pipe = api.load(bundle)
    console.print(f"[bold]backend[/]: {pipe.backend.describe()}")
    prompt = "What changed between <image> and <image>?"
    console.print(f"[bold]prompt[/]: {prompt}  [dim]images: {', '.join(paths)}[/]")
    g = pipe.generate(prompt, paths, max_new_tokens=16)
    console.print(f"[bold]answer[/] ({len(g.token_ids)} tokens, {g.finish_reason}): {g.text!r}")
    console.print({k: round(v, 2) for k, v in g.timings_ms.items()})
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
