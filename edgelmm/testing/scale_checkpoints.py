"""Random-weight checkpoints with the REAL architecture dimensions of the models edgelmm targets.

The tiny builders of `checkpoints.py` make every family fast to test; these make the toolkit
measurable at the sizes users run (issue 22): every matrix has the shape it has in the real
checkpoint, only the values are random. What is real and what is not:

- real: config.json dimensions (hidden sizes, layers, heads, KV heads, FFN, vocab size, positions,
  rope theta and Llama-3 rope scaling, tied or untied embeddings, image size, patch, pixel-shuffle
  scale), the processor's tiling and image-token counts, bf16 safetensors (as published).
- not real: the weights (seeded normal, std 0.02, norms near 1), and the tokenizer, which is the
  small byte-level BPE of `checkpoints.py` (a few hundred tokens with the family's special tokens);
  config.vocab_size stays the real one, as real checkpoints pad their embedding tables beyond the
  tokenizer.

Models (`SCALE_MODELS`):
  smolvlm-256m  HuggingFaceTB/SmolVLM-256M-Instruct: Idefics3, SigLIP-base/16 at 512 + SmolLM2-135M
  smolvlm-500m  HuggingFaceTB/SmolVLM-500M-Instruct: the same vision + SmolLM2-360M
  mantis-1b     LLaVA: SigLIP-so400m/14 at 384 (729 tokens) + Llama-3.2-1B (tied embeddings)
  3b            LLaVA: SigLIP-so400m/14 at 384 + Llama-3.2-3B (tied embeddings)
  qwen2vl-2b    Qwen/Qwen2-VL-2B-Instruct: its 675M native-resolution tower + the Qwen2-1.5B text model
  qwen2.5vl-3b  Qwen/Qwen2.5-VL-3B-Instruct: the windowed tower + the Qwen2.5-3B text model

Memory: the model is created on the meta device, materialised directly in bf16 and filled tensor
by tensor in row chunks (the fp32 scratch is at most 64M values), then saved in 2 GB shards, so a
build needs about half the model's fp32 size plus one shard (mantis-1b ~5 GB, 3b ~10 GB).
Builds are cached under a work directory and appear atomically (a hidden partial directory,
renamed when complete); a cached build whose recipe changed is rebuilt.

    python -m edgelmm.testing.scale_checkpoints build smolvlm-256m [--workdir /tmp/edgelmm-scale]
    python -m edgelmm.testing.scale_checkpoints info [MODEL ...]       # dimensions and parameter counts
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_WORKDIR = Path("/tmp/edgelmm-scale")
MARKER = "edgelmm_scale.json"   # written into each build: the recipe, parameter count, build time
RECIPE_VERSION = 1              # bump when the weights or files a recipe produces change


@dataclass(frozen=True)
class ScaleSpec:
    key: str
    real: str                 # the Hub checkpoint whose architecture this copies
    family: str               # "idefics3", "llava" or "qwen2vl"
    dirname: str              # directory name under the work dir ("Mantis" selects Mantis prompts)
    vision: dict
    text: dict
    image_size: int
    patch: int
    scale_factor: int = 0                       # idefics3: pixel-shuffle factor
    image_seq_len: int = 0                      # idefics3: tokens per tile
    longest_edge: int = 0                       # idefics3: processor size.longest_edge
    vision_feature_layer: int = -1              # llava
    vision_feature_select_strategy: str = "full"  # llava
    version: str = ""                           # qwen2vl: "2" or "2.5"
    notes: tuple[str, ...] = field(default=())

    def recipe(self) -> dict:
        return {"recipe_version": RECIPE_VERSION, **asdict(self)}

    def recipe_hash(self, seed: int, dtype: str, std: float) -> str:
        blob = json.dumps({**self.recipe(), "seed": seed, "dtype": dtype, "std": std}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# SigLIP base patch16 at 512 (SmolVLM-256M/500M's vision tower).
_SIGLIP_B16_512 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 12}
# SigLIP so400m patch14 at 384 (Mantis-8B-siglip-llama3's vision tower).
_SIGLIP_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                  "num_attention_heads": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
# Llama-3.2 rope: theta 500000 with llama3 frequency scaling to 131072 positions.
_LLAMA32_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
_LLAMA32 = {"vocab_size": 128256, "tie_word_embeddings": True, "rope_theta": 500000.0,
            "rope_scaling": _LLAMA32_ROPE, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
_QWEN2 = {"vocab_size": 151936, "tie_word_embeddings": True, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
          "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}}
_SMOLLM2 = {"vocab_size": 49280, "tie_word_embeddings": False, "rope_theta": 100000.0,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "head_dim": 64, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False}

SCALE_MODELS: dict[str, ScaleSpec] = {
    "smolvlm-256m": ScaleSpec(
        "smolvlm-256m", "HuggingFaceTB/SmolVLM-256M-Instruct", "idefics3", "SmolVLM-256M-Instruct-random",
        vision=_SIGLIP_B16_512,
        text={**_SMOLLM2, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
              "num_attention_heads": 9, "num_key_value_heads": 3},
        image_size=512, patch=16, scale_factor=4, image_seq_len=64, longest_edge=2048,
        notes=("untied lm_head, as the published checkpoint (256.5M parameters, 513 MB in bf16)",)),
    "smolvlm-500m": ScaleSpec(
        "smolvlm-500m", "HuggingFaceTB/SmolVLM-500M-Instruct", "idefics3", "SmolVLM-500M-Instruct-random",
        vision=_SIGLIP_B16_512,
        text={**_SMOLLM2, "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
              "num_attention_heads": 15, "num_key_value_heads": 5},
        image_size=512, patch=16, scale_factor=4, image_seq_len=64, longest_edge=2048),
    "mantis-1b": ScaleSpec(
        "mantis-1b", "SigLIP-so400m-patch14-384 + meta-llama/Llama-3.2-1B", "llava",
        "Mantis-1B-siglip-llama3.2-random",
        vision=_SIGLIP_SO400M,
        text={**_LLAMA32, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
              "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64},
        image_size=384, patch=14, vision_feature_layer=-2, vision_feature_select_strategy="full",
        notes=("Mantis-8B-siglip-llama3 uses vision_feature_layer -2 with strategy 'default' (728 tokens); "
               "'full' keeps all 729 patches, which llama.cpp's llava graph also does (edgelmm refuses "
               "GGUF for 'default' on SigLIP)",)),
    "3b": ScaleSpec(
        "3b", "SigLIP-so400m-patch14-384 + meta-llama/Llama-3.2-3B", "llava", "LLaVA-3B-siglip-llama3.2-random",
        vision=_SIGLIP_SO400M,
        text={**_LLAMA32, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
              "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128},
        image_size=384, patch=14, vision_feature_layer=-2, vision_feature_select_strategy="full",
        notes=("directory name without 'Mantis': plain LLaVA prompts (mantis-1b covers Mantis numbering)",)),
    "qwen2vl-2b": ScaleSpec(
        "qwen2vl-2b", "Qwen/Qwen2-VL-2B-Instruct", "qwen2vl", "Qwen2-VL-2B-Instruct-random",
        vision={"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "mlp_ratio": 4, "num_heads": 16,
                "hidden_act": "quick_gelu"},
        text={**_QWEN2, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
              "num_attention_heads": 12, "num_key_value_heads": 2},
        image_size=0, patch=14, version="2"),
    "qwen2.5vl-3b": ScaleSpec(
        "qwen2.5vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2vl", "Qwen2.5-VL-3B-Instruct-random",
        vision={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 2048,
                "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu"},
        text={**_QWEN2, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
              "num_attention_heads": 16, "num_key_value_heads": 2},
        image_size=0, patch=14, version="2.5"),
}


def spec(key: str) -> ScaleSpec:
    if key not in SCALE_MODELS:
        raise ValueError(f"unknown scale model {key!r}; choose from {', '.join(SCALE_MODELS)}")
    return SCALE_MODELS[key]


def checkpoint_dir(key: str, workdir: str | Path = DEFAULT_WORKDIR) -> Path:
    return Path(workdir) / spec(key).dirname


# ------------------------------------------------------------------------------------ configs

def _idefics3_parts(s: ScaleSpec):
    """(config, tokenizer-saving closure, processor-saving closure) for an Idefics3/SmolVLM spec.
    The tokenizer and special tokens are those of checkpoints.build_idefics3."""
    from tokenizers import processors
    from transformers import Idefics3Config

    from .checkpoints import SMOLVLM_TEMPLATE, _byte_level_tokenizer

    bos, eos, eou = "<|im_start|>", "<|im_end|>", "<end_of_utterance>"
    tiles = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    specials = ["<|endoftext|>", bos, eos, "<fake_token_around_image>", "<image>", eou, "<global-img>"] + tiles
    tok = _byte_level_tokenizer(specials, bos, eos)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # SmolVLM adds no BOS itself
    ids = {t: tok.token_to_id(t) for t in specials}
    text = {"model_type": "llama", **s.text, "bos_token_id": ids[bos], "eos_token_id": ids[eou],
            "pad_token_id": ids["<|endoftext|>"]}
    cfg = Idefics3Config(vision_config={**s.vision, "image_size": s.image_size, "patch_size": s.patch},
                         text_config=text, image_token_id=ids["<image>"], scale_factor=s.scale_factor,
                         tie_word_embeddings=s.text["tie_word_embeddings"])

    def save_text_side(out: Path):
        from transformers import Idefics3ImageProcessorPil, Idefics3Processor

        from .checkpoints import _save_tokenizer, _write_generation_config

        hf_tok = _save_tokenizer(tok, out, bos=bos, eos=eou, unk="<|endoftext|>", pad="<|endoftext|>",
                                 extra_special=["<fake_token_around_image>", "<image>", eou, "<global-img>"] + tiles,
                                 chat_template=SMOLVLM_TEMPLATE)
        image_processor = Idefics3ImageProcessorPil(size={"longest_edge": s.longest_edge},
                                                    max_image_size={"longest_edge": s.image_size})
        Idefics3Processor(image_processor=image_processor, tokenizer=hf_tok, image_seq_len=s.image_seq_len,
                          chat_template=SMOLVLM_TEMPLATE).save_pretrained(out)
        _write_generation_config(out, ids[bos], [ids[eou], ids[eos]], ids["<|endoftext|>"])

    return cfg, save_text_side


def _llava_parts(s: ScaleSpec):
    """(config, tokenizer/processor-saving closure) for a LLaVA SigLIP + Llama spec; tokenizer and
    special tokens as checkpoints.build_llava's."""
    from transformers import LlamaConfig, LlavaConfig, SiglipVisionConfig

    from .checkpoints import LLAMA3_TEMPLATE, _byte_level_tokenizer

    bos, eos, eot = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
    specials = [bos, eos, "<|start_header_id|>", "<|end_header_id|>", eot, "<image>", "<pad>"]
    tok = _byte_level_tokenizer(specials, bos, eos)
    ids = {t: tok.token_to_id(t) for t in specials}
    vcfg = SiglipVisionConfig(**s.vision, image_size=s.image_size, patch_size=s.patch)
    tcfg = LlamaConfig(**s.text, bos_token_id=ids[bos], eos_token_id=ids[eot], pad_token_id=ids["<pad>"])
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_index=ids["<image>"],
                      vision_feature_select_strategy=s.vision_feature_select_strategy,
                      vision_feature_layer=s.vision_feature_layer,
                      image_seq_length=(s.image_size // s.patch) ** 2
                      - (1 if s.vision_feature_select_strategy == "default" else 0),
                      tie_word_embeddings=s.text["tie_word_embeddings"])

    def save_text_side(out: Path):
        from transformers import LlavaProcessor, SiglipImageProcessorPil

        from .checkpoints import _save_tokenizer, _write_generation_config

        hf_tok = _save_tokenizer(tok, out, bos=bos, eos=eot, unk=None, pad="<pad>", extra_special=["<image>"],
                                 chat_template=LLAMA3_TEMPLATE)
        image_processor = SiglipImageProcessorPil(size={"height": s.image_size, "width": s.image_size})
        LlavaProcessor(image_processor=image_processor, tokenizer=hf_tok, patch_size=s.patch,
                       vision_feature_select_strategy=s.vision_feature_select_strategy,
                       chat_template=LLAMA3_TEMPLATE, num_additional_image_tokens=0).save_pretrained(out)
        _write_generation_config(out, ids[bos], [ids[eot], ids[eos]], ids["<pad>"])

    return cfg, save_text_side


def _qwen2vl_parts(s: ScaleSpec):
    """(config, tokenizer/processor-saving closure) for a Qwen2-VL / Qwen2.5-VL spec; tokenizer and
    special tokens as checkpoints.build_qwen2vl's, the processor's default pixel budget."""
    from tokenizers import processors
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    from .checkpoints import QWEN2VL_TEMPLATE, _byte_level_tokenizer

    eot, im_start, im_end = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
    vision_tokens = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _byte_level_tokenizer([eot, im_start, im_end, *vision_tokens], im_start, im_end)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    ids = {t: tok.token_to_id(t) for t in [eot, im_start, im_end, *vision_tokens]}
    config_class = Qwen2_5_VLConfig if s.version == "2.5" else Qwen2VLConfig
    cfg = config_class(
        vision_config={**s.vision, "patch_size": s.patch, "spatial_merge_size": 2, "temporal_patch_size": 2},
        text_config={**s.text, "bos_token_id": None, "eos_token_id": ids[im_end], "pad_token_id": ids[eot]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=s.text["tie_word_embeddings"])

    def save_text_side(out: Path):
        from transformers import Qwen2VLImageProcessorPil

        from .checkpoints import _save_tokenizer, _write_generation_config

        _save_tokenizer(tok, out, bos=None, eos=im_end, unk=None, pad=eot,
                        extra_special=[im_start, *vision_tokens], chat_template=QWEN2VL_TEMPLATE)
        Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
                                 patch_size=s.patch, merge_size=2, temporal_patch_size=2).save_pretrained(out)
        (out / "chat_template.jinja").write_text(QWEN2VL_TEMPLATE)
        _write_generation_config(out, ids[im_start], [ids[im_end], ids[eot]], ids[eot])

    return cfg, save_text_side


_PARTS = {"idefics3": _idefics3_parts, "llava": _llava_parts, "qwen2vl": _qwen2vl_parts}


def scale_config(key: str):
    """The transformers config object of `key` (token ids from the small tokenizer)."""
    s = spec(key)
    return _PARTS[s.family](s)[0]


def _model_class(s: ScaleSpec):
    import transformers

    name = {"idefics3": "Idefics3ForConditionalGeneration", "llava": "LlavaForConditionalGeneration",
            "qwen2vl": "Qwen2_5_VLForConditionalGeneration" if s.version == "2.5"
            else "Qwen2VLForConditionalGeneration"}[s.family]
    return getattr(transformers, name)


def meta_model(key: str):
    """The model of `key` on the meta device (no memory), for shapes and parameter counts."""
    import torch

    cfg = scale_config(key)
    with torch.device("meta"):
        return _model_class(spec(key))(cfg).eval()


def parameter_count(key: str) -> dict:
    """Parameters of `key` (tied tensors counted once), split into vision (+projector) and text."""
    model = meta_model(key)
    seen: set[int] = set()
    parts = {"vision": 0, "text": 0}
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        vision = any(k in name for k in ("vision", "visual", "connector", "multi_modal_projector"))
        parts["vision" if vision else "text"] += p.numel()
    return {"total": parts["vision"] + parts["text"], **parts}


# ------------------------------------------------------------------------------------ weights

def _fill_random(model, seed: int, std: float, chunk_values: int = 1 << 26) -> None:
    """Seeded random values in place, one tensor at a time and in row chunks, so the fp32 scratch
    is at most `chunk_values` values whatever the tensor. Matrices and embeddings: N(0, std);
    norm weights: 1 + N(0, std); biases and other vectors: N(0, std). Each tensor's generator is
    seeded from (seed, its name), so the values do not depend on the order tensors are visited."""
    import torch

    seen: set[int] = set()
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=True):
            if id(p) in seen:
                continue
            seen.add(id(p))
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            is_norm = p.dim() == 1 and ("norm" in name.lower()) and name.endswith("weight")
            flat = p.view(p.shape[0], -1) if p.dim() >= 1 else p.view(1, 1)
            rows_per_chunk = max(1, chunk_values // max(1, flat.shape[1]))
            for r in range(0, flat.shape[0], rows_per_chunk):
                block = torch.randn(flat[r:r + rows_per_chunk].shape, generator=gen, dtype=torch.float32).mul_(std)
                if is_norm:
                    block += 1.0
                flat[r:r + rows_per_chunk].copy_(block)


def _materialize(key: str, dtype_name: str, seed: int, std: float):
    """The model of `key`, created on the meta device, given real storage in `dtype` and filled
    with seeded random values: only the model's own bytes in that dtype are allocated. For saving
    only (its non-persistent buffers are uninitialised)."""
    import torch

    s = spec(key)
    cfg, save_text_side = _PARTS[s.family](s)
    dtype = getattr(torch, dtype_name)
    with torch.device("meta"):
        model = _model_class(s)(cfg).eval()
    model = model.to(dtype).to_empty(device="cpu")
    model.tie_weights()  # to_empty keeps shared Parameters; re-tie to be sure
    # Only parameters are saved: buffers left uninitialised by to_empty (rotary inverse frequencies,
    # position ids) are non-persistent, which this checks, so the model is for saving only.
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    extra = [n for n in model.state_dict() if n not in params]
    if extra:
        raise RuntimeError(f"{key}: persistent buffers would be saved uninitialised: {extra[:5]}")
    _fill_random(model, seed, std)
    return model, save_text_side


# ------------------------------------------------------------------------------------ build

def _rss_peak_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_scale_checkpoint(key: str, workdir: str | Path = DEFAULT_WORKDIR, *, seed: int = 0,
                           dtype: str = "bfloat16", std: float = 0.02, shard: str = "2GB",
                           log=lambda msg: None) -> Path:
    """Build (once) the random-weight checkpoint `key` under workdir and return its directory.
    A directory whose marker records another recipe (dimensions, seed, dtype, std) is rebuilt."""
    s = spec(key)
    out = checkpoint_dir(key, workdir)
    digest = s.recipe_hash(seed, dtype, std)
    marker = out / MARKER
    if marker.exists():
        try:
            if json.loads(marker.read_text()).get("recipe_hash") == digest:
                return out
        except (OSError, ValueError):
            pass
        log(f"{out} was built from another recipe; rebuilding")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by a killed build
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    start = time.perf_counter()
    try:
        log(f"building {key} ({s.real}) in {dtype}, seed {seed}, std {std}")
        model, save_text_side = _materialize(key, dtype, seed, std)
        counts = {"total": 0}
        seen: set[int] = set()
        for p in model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                counts["total"] += p.numel()
        log(f"  {counts['total'] / 1e6:.1f}M parameters filled; saving")
        model.save_pretrained(tmp, max_shard_size=shard)
        del model
        save_text_side(tmp)
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        umask = os.umask(0)
        os.umask(umask)
        for p in files:  # safetensors writes 0600; a download is readable under the umask
            p.chmod(0o666 & ~umask)
        info = {"key": key, "real": s.real, "recipe_hash": digest, "seed": seed, "dtype": dtype, "std": std,
                "parameters": counts["total"],
                "weights_bytes": sum(p.stat().st_size for p in files if p.suffix == ".safetensors"),
                "build_seconds": round(time.perf_counter() - start, 1),
                "build_peak_rss_bytes": _rss_peak_bytes(), "recipe": s.recipe()}
        (tmp / MARKER).write_text(json.dumps(info, indent=2))
        if out.exists():  # an old recipe: swap, then remove
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"  done in {time.perf_counter() - start:.1f} s: {out}")
    return out


def built_info(key: str, workdir: str | Path = DEFAULT_WORKDIR) -> dict | None:
    """The marker of a finished build of `key` under workdir, or None."""
    try:
        return json.loads((checkpoint_dir(key, workdir) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgelmm.testing.scale_checkpoints",
                                 description="Random-weight checkpoints with real model dimensions.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (once) and print the checkpoint directory")
    b.add_argument("models", nargs="+", choices=list(SCALE_MODELS))
    b.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    b.add_argument("--std", type=float, default=0.02)
    i = sub.add_parser("info", help="dimensions and parameter counts (meta device: no memory)")
    i.add_argument("models", nargs="*", help=f"default: all ({', '.join(SCALE_MODELS)})")
    i.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        for key in args.models:
            out = build_scale_checkpoint(key, args.workdir, seed=args.seed, dtype=args.dtype, std=args.std,
                                         log=lambda m: print(m, file=sys.stderr, flush=True))
            print(out, flush=True)
        return 0
    for key in args.models:
        if key not in SCALE_MODELS:
            ap.error(f"unknown model {key!r}; choose from {', '.join(SCALE_MODELS)}")
    rows = {key: {"real": spec(key).real, "family": spec(key).family, "params": parameter_count(key),
                  "vision": spec(key).vision, "text": spec(key).text}
            for key in (args.models or SCALE_MODELS)}
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for key, r in rows.items():
            p = r["params"]
            print(f"{key:14s} {p['total'] / 1e6:8.1f}M  (vision+projector {p['vision'] / 1e6:.1f}M, "
                  f"text {p['text'] / 1e6:.1f}M)  {r['real']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
