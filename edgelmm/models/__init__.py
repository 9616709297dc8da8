"""Models shipped inside the package.

REFERENCE_MODEL is edgelmm's own trained reference model (see its README.md, the model card): a
small LLaVA (SigLIP + Llama) trained on `edgelmm.synthetic` multi-image tasks. It is the default
model of `make demo`, `edgelmm eval` and `edgelmm watch`, and the yardstick for quantization and
backends. Retrain it with `python tools/train_reference.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError

REFERENCE_MODEL = Path(__file__).parent / "edgelmm-ref-siglip-llama"


def reference_model() -> Path:
    if not (REFERENCE_MODEL / "config.json").is_file():
        raise CheckpointError(f"{REFERENCE_MODEL}: the shipped reference model is missing (a partial checkout?); "
                              "retrain it with `python tools/train_reference.py`")
    return REFERENCE_MODEL


def reference_results() -> dict:
    """The held-out evaluation recorded when the model was trained (eval_results.json)."""
    return json.loads((reference_model() / "eval_results.json").read_text())
