"""Reads what a model directory (a HF checkpoint or an edgelmm bundle) says about prompting:
config, tokenizer, special tokens, chat template, processor settings, generation settings.

Pure json + `tokenizers`: the runtime side reads these on a device without transformers.
HF has written these files in several layouts over the years; each getter tries them in the
order transformers itself prefers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import CheckpointError

# Files a directory must have for the runtime to prompt the model.
REQUIRED_FILES = ("config.json", "tokenizer.json")
# Files copied into a bundle so that it prompts exactly as the checkpoint did.
PROMPT_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
    "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:  # HF writes these files as UTF-8; anything else is damaged
        raise CheckpointError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def check_model_dir(root: str | Path) -> Path:
    """`root` as a Path if it is a directory; else a CheckpointError naming it (also for a path the
    OS refuses to look up, such as a name over 255 characters, which Path.is_dir() raises for)."""
    if not isinstance(root, (str, Path)) or not str(root).strip():
        # Path("") is the current directory: an empty name from a config or a script is a mistake.
        raise CheckpointError(f"no model path given ({root!r}); name a bundle or a checkpoint directory")
    if "\x00" in str(root):
        raise CheckpointError(f"the model path {str(root)!r} contains a NUL byte")
    root = Path(root)
    try:
        is_dir = root.is_dir()
    except OSError as exc:
        raise CheckpointError(f"{root}: cannot open ({exc.strerror})") from None
    if not is_dir:
        raise CheckpointError(f"{root}: not a directory")
    return root


def check_checkpoint_dir(root: str | Path, needed_by: str) -> Path:
    """check_model_dir, and a CheckpointError when `root` is an edgelmm bundle (it has a manifest):
    `needed_by` (e.g. "export", "verify --reference") reads the Hugging Face checkpoint the bundle
    came from, not the bundle."""
    from .manifest import is_bundle

    root = check_model_dir(root)
    if is_bundle(root):
        raise CheckpointError(f"{root}: this is an edgelmm bundle, but {needed_by} needs the Hugging Face checkpoint "
                              "directory it was exported from (config.json, the weights, the tokenizer)")
    return root


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


@dataclass
class ModelFiles:
    root: Path
    config: dict[str, Any] = field(repr=False)

    @classmethod
    def open(cls, root: str | Path) -> "ModelFiles":
        root = check_model_dir(root)
        missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
        if missing:
            raise CheckpointError(f"{root}: missing {', '.join(missing)} (is this a complete model download?)")
        return cls(root=root, config=_read_json(root / "config.json"))

    def _optional_json(self, name: str) -> dict[str, Any]:
        p = self.root / name
        return _read_json(p) if p.is_file() else {}

    @cached_property
    def tokenizer_config(self) -> dict[str, Any]:
        return self._optional_json("tokenizer_config.json")

    @cached_property
    def generation_config(self) -> dict[str, Any]:
        return self._optional_json("generation_config.json")

    @cached_property
    def processor_config(self) -> dict[str, Any]:
        """Processor-level settings (image_seq_len, patch_size, ...) without the image processor."""
        cfg = dict(self._optional_json("processor_config.json"))
        cfg.pop("image_processor", None)
        return cfg

    @cached_property
    def image_processor_config(self) -> dict[str, Any]:
        nested = self._optional_json("processor_config.json").get("image_processor")
        if isinstance(nested, dict):
            return nested
        cfg = self._optional_json("preprocessor_config.json")
        if not cfg:
            raise CheckpointError(
                f"{self.root}: no image processor settings (neither processor_config.json with an "
                "'image_processor' entry nor preprocessor_config.json)"
            )
        return cfg

    @cached_property
    def video_processor_config(self) -> dict[str, Any]:
        """The video processor's settings where the model reads videos: processor_config.json's
        'video_processor' entry, else video_preprocessor_config.json, else (as transformers falls
        back) the image processor's preprocessor_config.json."""
        nested = self._optional_json("processor_config.json").get("video_processor")
        if isinstance(nested, dict):
            return nested
        return self._optional_json("video_preprocessor_config.json") or self.image_processor_config

    @cached_property
    def tokenizer(self):
        from tokenizers import Tokenizer

        path = self.root / "tokenizer.json"
        try:
            return Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise CheckpointError(f"{path}: cannot load tokenizer ({exc})") from None

    @cached_property
    def chat_template(self) -> str | None:
        p = self.root / "chat_template.jinja"
        if p.is_file():
            return _read_text(p)
        for src in (self._optional_json("chat_template.json"), self._optional_json("processor_config.json"),
                    self.tokenizer_config):
            tpl = src.get("chat_template")
            if isinstance(tpl, list):  # named templates: [{"name": "default", "template": ...}]
                named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
                tpl = named.get("default") or next(iter(named.values()), None)
            if isinstance(tpl, str) and tpl:
                return tpl
        return None

    def special_token(self, name: str) -> str | None:
        value = _token_str(self.tokenizer_config.get(name))
        if value is None:
            value = _token_str(self._optional_json("special_tokens_map.json").get(name))
        return value

    @cached_property
    def special_tokens_map(self) -> dict[str, str]:
        """What chat templates see as bos_token, eos_token, ... (as HF passes them)."""
        out = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
            value = self.special_token(name)
            if value is not None:
                out[name] = value
        return out

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    @cached_property
    def eos_token_ids(self) -> list[int]:
        """Stop tokens: generation_config's eos_token_id (what model.generate stops on), else the
        tokenizer's eos token."""
        eos = self.generation_config.get("eos_token_id")
        if eos is None:
            eos = self.config.get("eos_token_id", self.config.get("text_config", {}).get("eos_token_id"))
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        if not ids:
            tok = self.special_token("eos_token")
            tid = self.token_id(tok) if tok else None
            ids = [tid] if tid is not None else []
        return ids

    @property
    def text_config(self) -> dict[str, Any]:
        return self.config.get("text_config") or {}

    @property
    def context_length(self) -> int:
        return int(self.text_config.get("max_position_embeddings") or self.config.get("max_position_embeddings") or 4096)
