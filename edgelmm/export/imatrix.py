"""An importance matrix for llama.cpp's k-quants, computed from the calibration prompts.

For each linear layer of the text model, the mean square of each input column over every token of
the calibration prompts (images merged in, answers included): what llama.cpp's `llama-imatrix`
collects, keyed by GGUF tensor name. `llama_model_quantize` takes it through
`llama_model_quantize_params.imatrix` (a NULL-terminated array of {name, data, size}) and weights
each column's rounding error by it, so the columns that carry large activations are kept best.

Workstation side: it runs the PyTorch reference. Q/K rows are permuted in the GGUF, but the
permutation is of output rows, so input-column importances need no remapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import ExportError

# HF module name in a decoder layer -> GGUF tensor name stem (Llama and Mistral text models alike)
LAYER_LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}


@dataclass
class ImportanceMatrix:
    values: dict[str, np.ndarray]          # GGUF tensor name -> float32 [in_features], mean of x^2
    tokens: int
    prompts: int
    source: str
    skipped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "tokens": self.tokens, "tensors": len(self.values), "source": self.source}

    def as_ctypes(self, llama_cpp):
        """The NULL-terminated llama_model_imatrix_data array llama_model_quantize reads. The caller
        keeps the returned tuple alive until quantization ends (it owns the buffers)."""
        entry = llama_cpp.llama_model_imatrix_data
        names = [name.encode() for name in self.values]
        arrays = [np.ascontiguousarray(v, np.float32) for v in self.values.values()]
        table = (entry * (len(arrays) + 1))()
        for i, (name, arr) in enumerate(zip(names, arrays)):
            table[i].name = name
            table[i].data = arr.ctypes.data_as(llama_cpp.ctypes.POINTER(llama_cpp.ctypes.c_float))
            table[i].size = arr.size
        table[len(arrays)].name = None  # the terminator
        return table, names, arrays


def compute_imatrix(family, model, samples, source: str,
                    progress: Callable[[str], Any] | None = None) -> ImportanceMatrix:
    """Run the calibration samples (CalibSample: messages with answers, images) through the PyTorch
    model and collect each text linear layer's input-column mean squares, lm_head included."""
    import torch

    from ..pipeline import Pipeline
    from ..runtimes.torch import TorchBackend

    parts = family.torch_parts(model)
    pipe = Pipeline(family.files, family, TorchBackend(family, model=model))
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str):
        def hook(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    handles = []
    for i, layer in enumerate(parts.decoder.layers):
        for path, stem in LAYER_LINEARS.items():
            module = layer.get_submodule(path)
            handles.append(module.register_forward_pre_hook(hook_for(f"blk.{i}.{stem}.weight")))
    handles.append(parts.lm_head.register_forward_pre_hook(hook_for("output.weight")))
    tokens, skipped = 0, {}
    try:
        with torch.inference_mode():
            for k, sample in enumerate(samples):
                if progress:
                    progress(f"importance matrix: prompt {k + 1}/{len(samples)}")
                try:
                    prep = pipe.prepare(sample.messages, sample.images)
                except Exception as exc:  # a prompt this model cannot take (context, markers): counted
                    why = type(exc).__name__
                    skipped[why] = skipped.get(why, 0) + 1
                    continue
                embeds = torch.from_numpy(pipe.merged_embeddings(prep)).to(next(model.parameters()).dtype)
                n = embeds.shape[1]
                out = parts.decoder(inputs_embeds=embeds, attention_mask=torch.ones(1, n, dtype=torch.long),
                                    position_ids=torch.arange(n)[None], use_cache=False)
                parts.lm_head(out.last_hidden_state)  # every position, as llama-imatrix does
                tokens += n
    finally:
        for h in handles:
            h.remove()
    if not tokens:
        raise ExportError(f"no calibration prompt from {source} could be run for the importance matrix "
                          f"(skipped: {skipped})")
    values = {name: (sums[name] / counts[name]).float().numpy() for name in sums}
    bad = [name for name, v in values.items() if not np.isfinite(v).all()]
    if bad:
        raise ExportError(f"the importance matrix has non-finite values for {bad[:3]} (the model overflows on "
                          "the calibration prompts)")
    return ImportanceMatrix(values, tokens, len(samples) - sum(skipped.values()), source, skipped)
