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
from ..gguf_names import TEXT_ARCHES, block_linears



# Tokens the importance matrix is averaged over. It is a per-column mean of x^2, which a few thousand
# tokens estimate well; every prompt beyond costs a full prefill of the fp32 model (a Mantis-1B
# prompt of three images: ~100 s on two cores), so 64 prompts would take the export hours.
IMATRIX_TOKENS = 4096

# Image tiles the importance matrix runs through the vision tower, at most. The matrix weighs the
# LLM's input columns, of which image tokens are one part; every tile costs a full vision pass
# (SmolVLM, 17 tiles an image: ~1.5 s each on two cores, the export's largest cost at 256 tiles).
IMATRIX_TILES = 32


@dataclass
class ImportanceMatrix:
    values: dict[str, np.ndarray]          # GGUF tensor name -> float32 [in_features], mean of x^2
    tokens: int
    prompts: int
    source: str
    skipped: dict[str, int] = field(default_factory=dict)
    tiles: int = 0                         # image tiles through the vision tower

    def summary(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "tokens": self.tokens, "tiles": self.tiles, "tensors": len(self.values),
                "source": self.source}

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


def compute_imatrix(family, model, samples, source: str, progress: Callable[[str], Any] | None = None,
                    max_tiles: int = IMATRIX_TILES, max_tokens: int = IMATRIX_TOKENS) -> ImportanceMatrix:
    """Run the calibration samples (CalibSample: messages with answers, images) through the PyTorch
    model and collect each text linear layer's input-column mean squares, lm_head included.

    Nearly all the time is the vision tower (SmolVLM: ~210 GFLOP per 512-px tile, 17 tiles per
    image, against ~0.3 GFLOP per token for its decoder), so prompts run in order while their image
    tiles total at most `max_tiles` (the first prompt always), and stop once `max_tokens` tokens
    have been seen; the rest are counted in `skipped`."""
    import torch

    from ..pipeline import Pipeline
    from ..runtimes.torch import TorchBackend

    parts = family.torch_parts(model)
    pipe = Pipeline(family.files, family, TorchBackend(family, model=model))
    dtype = next(model.parameters()).dtype
    sums: dict[str, torch.Tensor] = {}    # float64 [in_features]: sum of x^2 over tokens
    counts: dict[str, int] = {}

    def accumulate(name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        sq = (x * x).sum(0)  # float32 over one prompt's tokens; the running total is float64
        if name in sums:
            sums[name] += sq
        else:
            sums[name] = sq.double()
        counts[name] = counts.get(name, 0) + x.shape[0]

    def hook_for(name: str):
        return lambda _module, inputs: accumulate(name, inputs[0])

    linears = block_linears(TEXT_ARCHES[family.gguf_plan().text_arch])   # the GGUF's tensor names
    handles = []
    for i, layer in enumerate(parts.decoder.layers):
        for path, name in linears.items():
            module = layer.get_submodule(path)
            handles.append(module.register_forward_pre_hook(hook_for(name.format(i=i))))
    tokens, tiles, prompts, skipped = 0, 0, 0, {}
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
                n_tiles = sum(prep.vision.tiles_per_image)
                if prompts and tiles + n_tiles > max_tiles:
                    skipped["tile budget"] = len(samples) - k
                    break
                embeds = torch.from_numpy(pipe.merged_embeddings(prep)).to(dtype)
                n = embeds.shape[1]
                positions = pipe.as_position_ids(pipe.prompt_positions(prep)[:, None, :])  # M-RoPE: [3, 1, n]
                out = parts.decoder(inputs_embeds=embeds, attention_mask=torch.ones(1, n, dtype=torch.long),
                                    position_ids=torch.from_numpy(positions), use_cache=False)
                # lm_head's input at every position, as llama-imatrix takes it; the logits themselves
                # ([n, vocab]: 1.7 GB for 3400 tokens of Llama-3.2) are not needed.
                accumulate("output.weight", out.last_hidden_state)
                tokens, tiles, prompts = tokens + n, tiles + n_tiles, prompts + 1
                if tokens >= max_tokens:
                    skipped["token budget"] = len(samples) - k - 1
                    break
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
    return ImportanceMatrix(values, tokens, prompts, source, skipped, tiles)

