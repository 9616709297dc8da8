"""Builders for tiny checkpoints of the real architectures.

Each builder writes a directory that looks like a Hub download: config.json, safetensors weights,
generation_config.json, tokenizer (tokenizer.json + tokenizer_config.json + chat template) and the
processor/image-processor configs, with the special tokens the family's real processor expects.
Sizes are chosen so that the whole family suite stays fast on two CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


_CORPUS = [
    "What colour is the shape in image 2? The shape is red.",
    "Which image has more circles? The first image has more circles than the second one.",
    "Are image 1 and image 3 the same? No, they are different.",
    "What changed between the first and the last frame? A blue square moved to the left.",
    "Which frame is abnormal? The third frame is abnormal because a triangle fell over.",
    "Describe the difference of the two images as much as you can.",
    "How many wallets are there in image 1 and image 2 respectively?",
    "Is anything abnormal? Answer yes or no, then describe it.",
    "A cat sits on a mat. A dog runs in the park. The sky is blue and the grass is green.",
    "count the objects: one two three four five six seven eight nine ten 0123456789",
    "User: Assistant: system user assistant image Image frame example query answer",
]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# The chat template Idefics2/Idefics3 checkpoints ship (role capitalised, ':' before an image).
IDEFICS_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SMOLVLM_TEMPLATE = "<|im_start|>" + IDEFICS_TEMPLATE


def _byte_level_tokenizer(special: list[str], bos: str, eos: str, vocab_size: int = 384):
    """A GPT-2/Llama-3 style byte-level BPE (what Llama-3 and SmolLM use)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return tok


def _metaspace_tokenizer(special: list[str], bos: str, vocab_size: int = 384):
    """A Llama-2/Mistral style sentencepiece BPE with byte fallback ('▁' for spaces)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, special_tokens=special + byte_tokens)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return tok


def _save_tokenizer(tok, out: Path, *, bos: str, eos: str, unk: str | None, pad: str | None,
                    extra_special: list[str], chat_template: str, **extra) -> "object":
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
        extra_special_tokens=extra_special, chat_template=chat_template, **extra,
    )
    hf.save_pretrained(out)
    return hf


def _init_weights_wide(model, std: float = 0.3, seed: int = 0):
    """Random init with a wider spread than HF's default 0.02, so logits are not near-tied and greedy
    decoding is decided by the weights rather than by rounding noise."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std / max(1.0, p.shape[-1] ** 0.5) * 4)
            elif "norm" in name or "layernorm" in name.lower():
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def _write_generation_config(out: Path, bos_id: int, eos_ids: list[int], pad_id: int | None):
    cfg = {"bos_token_id": bos_id, "eos_token_id": eos_ids if len(eos_ids) > 1 else eos_ids[0]}
    if pad_id is not None:
        cfg["pad_token_id"] = pad_id
    (out / "generation_config.json").write_text(json.dumps(cfg, indent=2))


# ---------------------------------------------------------------- llava (Mantis-8B-*-llama3)

def build_llava(out: Path, vision: str = "siglip", seed: int = 0, *, image_size: int = 32, patch: int = 8,
                vision_dims: dict | None = None, text_dims: dict | None = None, max_positions: int = 1024) -> Path:
    """A LLaVA checkpoint; the defaults are tiny, the size arguments make benchmark-sized ones
    (text_dims may set vocab_size above the tokenizer's size, as real checkpoints pad it)."""
    import torch
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, SiglipImageProcessorPil,
                              SiglipVisionConfig)

    bos, eos, eot = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
    specials = [bos, eos, "<|start_header_id|>", "<|end_header_id|>", eot, "<image>", "<pad>"]
    tok = _byte_level_tokenizer(specials, bos, eos)
    hf_tok = _save_tokenizer(tok, out, bos=bos, eos=eot, unk=None, pad="<pad>", extra_special=["<image>"],
                             chat_template=LLAMA3_TEMPLATE)
    image_token_id = tok.token_to_id("<image>")

    vdims = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
             **(vision_dims or {})}
    tdims = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": len(hf_tok), **(text_dims or {})}
    if vision == "siglip":
        vcfg = SiglipVisionConfig(**vdims, image_size=image_size, patch_size=patch)
        strategy, layer = "full", -1
        image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    elif vision == "clip":
        vcfg = CLIPVisionConfig(**vdims, image_size=image_size, patch_size=patch, projection_dim=32)
        strategy, layer = "default", -2
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                                crop_size={"height": image_size, "width": image_size})
    else:
        raise ValueError(f"unknown vision tower {vision!r} (siglip or clip)")
    tcfg = LlamaConfig(**tdims, max_position_embeddings=max_positions,
                       bos_token_id=tok.token_to_id(bos), eos_token_id=tok.token_to_id(eot),
                       pad_token_id=tok.token_to_id("<pad>"), rope_theta=500000.0)
    num_tokens = (image_size // patch) ** 2
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_index=image_token_id,
                      vision_feature_select_strategy=strategy, vision_feature_layer=layer,
                      image_seq_length=num_tokens)
    torch.manual_seed(seed)
    model = _init_weights_wide(LlavaForConditionalGeneration(cfg).eval(), seed=seed)
    model.save_pretrained(out)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=hf_tok, patch_size=patch,
                               vision_feature_select_strategy=strategy, chat_template=LLAMA3_TEMPLATE,
                               num_additional_image_tokens=1 if vision == "clip" else 0)
    processor.save_pretrained(out)
    _write_generation_config(out, tok.token_to_id(bos), [tok.token_to_id(eot), tok.token_to_id(eos)],
                             tok.token_to_id("<pad>"))
    return out


# ---------------------------------------------------------------- idefics2 (Mantis-8B-Idefics2)

def build_idefics2(out: Path, seed: int = 0, do_image_splitting: bool = True) -> Path:
    import torch
    from transformers import (Idefics2Config, Idefics2ForConditionalGeneration, Idefics2ImageProcessorPil,
                              Idefics2Processor)

    bos, eos, eou = "<s>", "</s>", "<end_of_utterance>"
    specials = ["<unk>", bos, eos, "<fake_token_around_image>", "<image>", eou]
    tok = _metaspace_tokenizer(specials, bos)
    hf_tok = _save_tokenizer(tok, out, bos=bos, eos=eos, unk="<unk>", pad="<unk>",
                             extra_special=["<fake_token_around_image>", "<image>", eou],
                             chat_template=IDEFICS_TEMPLATE)
    n_latents = 8
    cfg = Idefics2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        perceiver_config={"hidden_size": 64, "resampler_n_latents": n_latents, "resampler_depth": 1,
                          "resampler_n_heads": 2, "resampler_head_dim": 16, "num_key_value_heads": 1},
        text_config={"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "vocab_size": len(hf_tok), "max_position_embeddings": 1024,
                     "bos_token_id": tok.token_to_id(bos), "eos_token_id": tok.token_to_id(eos),
                     "pad_token_id": tok.token_to_id("<unk>")},
        image_token_id=tok.token_to_id("<image>"),
    )
    torch.manual_seed(seed)
    model = _init_weights_wide(Idefics2ForConditionalGeneration(cfg).eval(), seed=seed)
    model.save_pretrained(out)
    image_processor = Idefics2ImageProcessorPil(size={"shortest_edge": 16, "longest_edge": 48},
                                                do_image_splitting=do_image_splitting)
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=hf_tok, image_seq_len=n_latents,
                                  chat_template=IDEFICS_TEMPLATE)
    processor.save_pretrained(out)
    _write_generation_config(out, tok.token_to_id(bos), [tok.token_to_id(eos), tok.token_to_id(eou)],
                             tok.token_to_id("<unk>"))
    return out


# ---------------------------------------------------------------- idefics3 (SmolVLM / 1B class)

def build_idefics3(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil,
                              Idefics3Processor)

    bos, eos, eou = "<|im_start|>", "<|im_end|>", "<end_of_utterance>"
    tiles = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    specials = ["<|endoftext|>", bos, eos, "<fake_token_around_image>", "<image>", eou, "<global-img>"] + tiles
    tok = _byte_level_tokenizer(specials, bos, eos)
    # SmolVLM's tokenizer adds no BOS of its own: the chat template starts with <|im_start|>.
    from tokenizers import processors
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf_tok = _save_tokenizer(tok, out, bos=bos, eos=eou, unk="<|endoftext|>", pad="<|endoftext|>",
                             extra_special=["<fake_token_around_image>", "<image>", eou, "<global-img>"] + tiles,
                             chat_template=SMOLVLM_TEMPLATE)
    image_size, patch, scale = 32, 8, 2
    seq_len = ((image_size // patch) ** 2) // (scale ** 2)
    cfg = Idefics3Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": image_size, "patch_size": patch},
        text_config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": len(hf_tok),
                     "max_position_embeddings": 1024, "bos_token_id": tok.token_to_id(bos),
                     "eos_token_id": tok.token_to_id(eou), "pad_token_id": tok.token_to_id("<|endoftext|>")},
        image_token_id=tok.token_to_id("<image>"), scale_factor=scale,
    )
    torch.manual_seed(seed)
    model = _init_weights_wide(Idefics3ForConditionalGeneration(cfg).eval(), seed=seed)
    model.save_pretrained(out)
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 2 * image_size},
                                                max_image_size={"longest_edge": image_size})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=hf_tok, image_seq_len=seq_len,
                                  chat_template=SMOLVLM_TEMPLATE)
    processor.save_pretrained(out)
    _write_generation_config(out, tok.token_to_id(bos), [tok.token_to_id(eou), tok.token_to_id(eos)],
                             tok.token_to_id("<|endoftext|>"))
    return out


# ---------------------------------------------------------------- qwen2vl (Qwen2-VL-2B class)

# The chat template Qwen2-VL checkpoints ship (a default system turn; each image part becomes
# <|vision_start|><|image_pad|><|vision_end|>, each video part <|vision_start|><|video_pad|><|vision_end|>).
QWEN2VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen2vl(out: Path, seed: int = 0, version: str = "2", window: int = 16, max_pixels: int = 2304) -> Path:
    """Qwen2-VL (version "2") or Qwen2.5-VL ("2.5"): 4-pixel patches merged 2x2 (8-pixel tokens)
    and an area budget of 256..2304 pixels, so the sample images keep their own sizes and token
    counts; M-RoPE sections [2, 3, 3] of a 16-wide head; RMSNorm epsilon 1e-6 as in the released
    models. Qwen2.5-VL's first vision layer attends within 16-pixel windows (2x2 tokens), its second
    over the whole image; `window` 112 (the released models' 112 pixels, which llama.cpp assumes)
    with a larger `max_pixels` gives 14x14-token windows that images over 112 pixels split. The video
    processor's settings are saved as its video_preprocessor_config.json (transformers builds the
    processor itself only with torchvision, which the workstation side does not install): the same
    area budget as images, so short clips stay a few tokens a frame."""
    import torch
    import transformers
    from transformers import Qwen2VLImageProcessorPil
    from tokenizers import processors

    eot, im_start, im_end = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
    vision_tokens = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _byte_level_tokenizer([eot, im_start, im_end, *vision_tokens], im_start, im_end)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # Qwen2's tokenizer adds no BOS
    hf_tok = _save_tokenizer(tok, out, bos=None, eos=im_end, unk=None, pad=eot,
                             extra_special=[im_start, *vision_tokens], chat_template=QWEN2VL_TEMPLATE)
    patch, merge = 4, 2
    geometry = {"patch_size": patch, "spatial_merge_size": merge, "temporal_patch_size": 2}
    if version == "2":
        config_class, model_class = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
        vision = {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2, "hidden_size": 64, **geometry}
    elif version == "2.5":
        config_class, model_class = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                  "window_size": window, "fullatt_block_indexes": [1], **geometry}
    else:
        raise ValueError(f"unknown Qwen2-VL version {version!r} (2 or 2.5)")
    cfg = config_class(
        vision_config=vision,
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": len(hf_tok),
                     "max_position_embeddings": 1024, "bos_token_id": None, "rms_norm_eps": 1e-6,
                     "eos_token_id": tok.token_to_id(im_end), "pad_token_id": tok.token_to_id(eot),
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                         "mrope_section": [2, 3, 3]}},
        image_token_id=tok.token_to_id("<|image_pad|>"), video_token_id=tok.token_to_id("<|video_pad|>"),
        vision_start_token_id=tok.token_to_id("<|vision_start|>"),
        vision_end_token_id=tok.token_to_id("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = _init_weights_wide(model_class(cfg).eval(), seed=seed)
    model.save_pretrained(out)
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 256, "longest_edge": max_pixels},
                                               patch_size=patch, merge_size=merge, temporal_patch_size=2)
    image_processor.save_pretrained(out)
    (out / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "Qwen2VLVideoProcessor", "size": {"shortest_edge": 256, "longest_edge": max_pixels},
        "patch_size": patch, "merge_size": merge, "temporal_patch_size": 2, "do_sample_frames": False,
        "image_mean": list(image_processor.image_mean), "image_std": list(image_processor.image_std)}, indent=2))
    (out / "chat_template.jinja").write_text(QWEN2VL_TEMPLATE)
    _write_generation_config(out, tok.token_to_id(im_start), [tok.token_to_id(im_end), tok.token_to_id(eot)],
                             tok.token_to_id(eot))
    return out


# The benchmark checkpoint: ~65M parameters, hidden/FFN multiples of 256 (so GGUF k-quants apply
# without fallback), vocab 32000 so that lm_head costs what it does in practice.
BENCH_VISION = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 6}
BENCH_TEXT = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 8,
              "num_key_value_heads": 4, "vocab_size": 32000}


BENCH_TEXT_200M = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "vocab_size": 32000}


def build_bench_checkpoint(workdir: str | Path, size: str = "60m") -> Path:
    """Build (once) a benchmark LLaVA-SigLIP checkpoint under workdir and return its directory:
    "60m" (text hidden 512 x 6 layers) or "200m" (hidden 1024 x 12, FFN 2816); random weights,
    hidden and FFN sizes multiples of 256 (k-quants apply), vocab 32000, 4096 positions."""
    text = {"60m": BENCH_TEXT, "200m": BENCH_TEXT_200M}[size]
    out = Path(workdir) / f"Mantis-bench{size}-siglip-llama3"
    if not (out / "config.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        build_llava(out, "siglip", image_size=224, patch=16, vision_dims=BENCH_VISION, text_dims=text,
                    max_positions=4096)
    return out


FAMILY_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "llava-siglip": lambda out: build_llava(out, "siglip"),
    "llava-clip": lambda out: build_llava(out, "clip"),
    "idefics2": build_idefics2,
    "idefics3": build_idefics3,
    "qwen2vl": build_qwen2vl,
    "qwen2.5vl": lambda out: build_qwen2vl(out, version="2.5"),
    "qwen2.5vl-w112": lambda out: build_qwen2vl(out, version="2.5", window=112, max_pixels=128 * 128),
}

# Directory names as a user's download would have them; "mantis" in the name selects Mantis'
# numbered-image prompt style for the llava family, as for the real checkpoints.
CHECKPOINT_NAMES = {
    "llava-siglip": "Mantis-tiny-siglip-llama3",
    "llava-clip": "Mantis-tiny-clip-llama3",
    "idefics2": "Mantis-tiny-Idefics2",
    "idefics3": "SmolVLM-tiny",
    "qwen2vl": "Qwen2-VL-tiny",
    "qwen2.5vl": "Qwen2.5-VL-tiny",
    "qwen2.5vl-w112": "Qwen2.5-VL-tiny-w112",
}


def build_tiny_checkpoint(kind: str, root: str | Path) -> Path:
    """Build (once) the tiny checkpoint `kind` under `root` and return its directory."""
    if kind not in FAMILY_BUILDERS:
        raise ValueError(f"unknown tiny checkpoint {kind!r}; choose from {sorted(FAMILY_BUILDERS)}")
    out = Path(root) / CHECKPOINT_NAMES[kind]
    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    FAMILY_BUILDERS[kind](tmp)
    tmp.rename(out)
    return out
