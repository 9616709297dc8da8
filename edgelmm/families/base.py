"""What every model family knows: how to recognise its checkpoints, preprocess images exactly as
its HF processor does (numpy/PIL only), expand `<image>` markers into the model's image tokens,
and (on the workstation side) where the vision tower, embedding and decoder live in the HF model."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from ..errors import CheckpointError, PromptError
from ..gguf_names import SIGLIP_BLOCK, SIGLIP_TOWER, TensorRule
from ..modelfiles import ModelFiles
from ..prompt import VIDEO_MARKER
from ..video import VideoFrames


@dataclass
class VisionInputs:
    """Preprocessed images of one prompt. The vision graph sees tiles: one per image for LLaVA,
    several per image for Idefics image splitting; each tile yields the same number of feature rows.
    A family whose images keep their own size (Qwen2-VL) gives a list of [1, 3, H_i, W_i] arrays,
    one per image, and the vision graph takes the tiles of one size at a time (`tile_groups`)."""
    pixel_values: np.ndarray | list[np.ndarray]  # [N_tiles, 3, H, W] float32, or one array per image
    pixel_attention_mask: np.ndarray | None      # [N_tiles, H, W] int64 (Idefics), else None
    tiles_per_image: list[int]
    replacements: list[str]                      # the text each image's marker expands to
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # original (H, W)
    token_grids: list[tuple[int, int]] = field(default_factory=list)  # (rows, columns) of each image's tokens
    # Videos (families that read them): each item's kind, in prompt order ("image" or "video"; empty:
    # all images). A video is a run of tiles, one per frame pair ([G, 2, 3, H, W]), each giving one
    # grid of tokens; `seconds_per_group` is the time each pair spans (None for an image).
    kinds: list[str] = field(default_factory=list)
    seconds_per_group: list[float | None] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        """Images and videos: every item that has a marker in the prompt."""
        return len(self.tiles_per_image)

    def kind(self, i: int) -> str:
        return self.kinds[i] if self.kinds else "image"

    @property
    def num_tiles(self) -> int:
        return sum(len(a) for a in self.tile_groups())

    def tile_groups(self) -> list[np.ndarray]:
        """The tiles as the vision graph takes them: one [n, 3, H, W] array where all tiles share a
        size, else runs of consecutive tiles of one size (Pipeline.image_features runs each size once)."""
        if isinstance(self.pixel_values, np.ndarray):
            return [self.pixel_values] if len(self.pixel_values) else []
        groups: list[np.ndarray] = []
        for tile in self.pixel_values:
            if groups and groups[-1].shape[1:] == tile.shape[1:]:
                groups[-1] = np.concatenate([groups[-1], tile])
            else:
                groups.append(tile)
        return groups

    def tile(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tile i as a batch of one, with its mask."""
        if isinstance(self.pixel_values, np.ndarray):
            mask = None if self.pixel_attention_mask is None else self.pixel_attention_mask[i:i + 1]
            return self.pixel_values[i:i + 1], mask
        flat = [t for group in self.pixel_values for t in group]
        return flat[i][None], None

    def without_pixels(self) -> "VisionInputs":
        """The same prompt's layout with no tiles kept (what a recorded reference run holds)."""
        from dataclasses import replace

        empty = [] if isinstance(self.pixel_values, list) else self.pixel_values[:0]
        mask = None if self.pixel_attention_mask is None else self.pixel_attention_mask[:0]
        return replace(self, pixel_values=empty, pixel_attention_mask=mask)


@dataclass(frozen=True)
class ClipShape:
    """A vision transformer's dimensions as clip.cpp reads them (the clip.vision.* keys)."""
    image_size: int
    patch_size: int
    width: int
    ffn: int
    blocks: int
    heads: int
    eps: float
    activation: str            # the MLP's: "gelu" (tanh form), "gelu_quick" or "silu"

    @classmethod
    def from_vision_config(cls, vcfg: dict[str, Any]) -> "ClipShape":
        """A SigLIP / CLIP vision config (HF names)."""
        act = vcfg.get("hidden_act", "gelu")
        return cls(int(vcfg["image_size"]), int(vcfg["patch_size"]), int(vcfg["hidden_size"]),
                   int(vcfg["intermediate_size"]), int(vcfg["num_hidden_layers"]), int(vcfg["num_attention_heads"]),
                   float(vcfg.get("layer_norm_eps", 1e-6)), "gelu_quick" if act == "quick_gelu" else "gelu")


@dataclass(frozen=True)
class GGUFPlan:
    """How a family becomes llama.cpp's GGUF pair, as data (gguf_names.py holds the tables):
    the text architecture of the LLM GGUF, and for the mmproj ("clip") GGUF the projector type
    llama.cpp knows it by, where the vision transformer sits in the HF model, its tower and block
    tensor tables (SigLIP/CLIP's by default), the family's own tensors (llama.cpp name -> attribute
    path from the model), the tower's shape (None: read from a SigLIP/CLIP vision_config) and extra
    metadata keys."""
    projector: str                            # clip.projector_type: "mlp", "idefics3", "qwen2vl_merger", ...
    tower: str                                # attribute path of the vision transformer
    tensors: tuple[tuple, ...]                # gguf_names.TensorRule fields, relative to the model
    keys: tuple[tuple[str, Any], ...] = ()    # (GGUF key, uint32 or list of ints)
    text_arch: str = "llama"                  # gguf_names.TEXT_ARCHES
    tower_tensors: tuple[TensorRule, ...] = SIGLIP_TOWER
    blocks: str = "encoder.layers"            # attribute path of the block list, from the tower
    block_tensors: tuple[TensorRule, ...] = SIGLIP_BLOCK
    shape: ClipShape | None = None


@dataclass(frozen=True)
class GGUFRefusal:
    """Why llama.cpp cannot represent this model; `forceable`: written anyway with --force."""
    reason: str
    forceable: bool = False


@dataclass
class TorchParts:
    """The HF model split along the graph contract (used by the reference backend and exporters)."""
    vision: Callable[[Any, Any], Any]   # (pixel_values [N,3,H,W], mask [N,H,W] | None) -> [N, T, D]
    embed_tokens: Any                   # nn.Embedding
    decoder: Any                        # the text model (no lm_head): inputs_embeds -> hidden states
    lm_head: Any                        # nn.Linear


class Family(ABC):
    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    image_marker: ClassVar[str] = "<image>"
    # The image token when the processor config names none.
    default_image_token: ClassVar[str] = "<image>"
    # Tiles of different sizes within one prompt (padded + masked): the vision graph needs dynamic H, W.
    variable_tile_size: ClassVar[bool] = False
    # Each image keeps its own size (no padding): the vision graph takes one size at a time, with
    # dynamic H, W (VisionInputs.tile_groups).
    tiles_keep_size: ClassVar[bool] = False
    # Components of a position: 1 (a token's index) or 3 (M-RoPE: temporal, height, width). The
    # decoder takes position_ids [batch, seq] or [3, batch, seq].
    position_dims: ClassVar[int] = 1

    # The token a video's frames become (None: the family reads no videos).
    default_video_token: ClassVar[str | None] = None

    def __init__(self, files: ModelFiles, prompt_style: str | None = None):
        self.files = files
        self.config = files.config
        self.image_token = self.files.processor_config.get("image_token", self.default_image_token)
        image_token_id = files.token_id(self.image_token)
        if image_token_id is None:
            raise CheckpointError(f"{files.root}: tokenizer has no {self.image_token!r} token")
        self.image_token_id = image_token_id
        self.video_token = self.video_token_id = None
        if self.default_video_token is not None:
            self.video_token = self.files.processor_config.get("video_token", self.default_video_token)
            self.video_token_id = files.token_id(self.video_token)
            if self.video_token_id is None:
                raise CheckpointError(f"{files.root}: tokenizer has no {self.video_token!r} token")
        self.prompt_style = prompt_style or "plain"

    @property
    def reads_videos(self) -> bool:
        return self.video_token_id is not None

    @property
    def media_token_ids(self) -> tuple[int, ...]:
        """The token ids image and video features take the place of."""
        return (self.image_token_id,) if self.video_token_id is None else (self.image_token_id, self.video_token_id)

    @classmethod
    def matches(cls, config: dict[str, Any]) -> bool:
        return config.get("model_type") in cls.model_types

    @abstractmethod
    def preprocess(self, images: list[np.ndarray]) -> VisionInputs:
        """RGB uint8 HxWx3 images -> tiles, masks and each image's marker replacement text."""

    def preprocess_media(self, items: list[np.ndarray | VideoFrames]) -> VisionInputs:
        """Images (HxWx3 uint8) and videos (VideoFrames) in prompt order -> VisionInputs. A family
        that reads videos overrides this; the others take images only."""
        for i, item in enumerate(items):
            if isinstance(item, VideoFrames):
                raise PromptError(f"item {i + 1} of the prompt's media is a video, and {self.name} models read "
                                  "images only")
        return self.preprocess(items)

    @abstractmethod
    def expand_prompt(self, text: str, vision: VisionInputs) -> str:
        """Replace the i-th `<image>` marker of `text` with image i's tokens, as the HF processor does."""

    def substitute_images(self, text: str, vision: VisionInputs) -> str:
        """`text` with its i-th image (or video) token replaced by item i's replacement text."""
        tokens = [self.image_token] + ([self.video_token] if self.video_token else [])
        pieces = re.split("(" + "|".join(re.escape(t) for t in tokens) + ")", text)
        out = [pieces[0]]
        for i, (token, piece) in enumerate(zip(pieces[1::2], pieces[2::2])):
            if i < vision.num_images and token != (self.video_token if vision.kind(i) == "video" else self.image_token):
                raise PromptError(f"the prompt's marker {i + 1} is {'a video' if token == self.video_token else 'an image'} "
                                  f"but item {i + 1} of its media is {'a video' if vision.kind(i) == 'video' else 'an image'}")
            out.append(vision.replacements[i] if i < vision.num_images else token)
            out.append(piece)
        return "".join(out)

    def count_image_markers(self, text: str) -> int:
        """How many images a rendered prompt places (the chat template's image parts, or markers)."""
        return text.count(self.image_marker)

    def count_video_markers(self, text: str) -> int:
        """How many videos a rendered prompt places."""
        return text.count(VIDEO_MARKER)

    def positions(self, input_ids: np.ndarray, vision: VisionInputs) -> np.ndarray:
        """[position_dims, S] position ids of a prompt's tokens: 0..S-1 unless the family says otherwise."""
        return np.arange(len(input_ids), dtype=np.int64)[None]

    def verify_image_sizes(self, sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The (H, W) of verify's sample images for this model (verify.CASES gives small ones)."""
        return sizes

    def num_image_tokens(self, height: int, width: int) -> int:
        """How many image tokens an image of this size becomes (for `edgelmm info`)."""
        dummy = np.zeros((height, width, 3), dtype=np.uint8)
        return self.preprocess([dummy]).replacements[0].count(self.image_token)

    def video_tokens(self, video: VideoFrames) -> int:
        """How many tokens a clip becomes, from its frame count and size alone (before any pixel is
        resized: a clip too long for the context is refused before it costs memory)."""
        raise PromptError(f"{self.name} models read images only")

    def num_video_tokens(self, height: int, width: int) -> int:
        """How many tokens a pair of video frames of this size becomes (families that read videos)."""
        pair = VideoFrames(np.zeros((2, height, width, 3), np.uint8))
        return self.preprocess_media([pair]).replacements[0].count(self.video_token)

    @abstractmethod
    def torch_parts(self, model) -> TorchParts:
        """Split a loaded HF model along the graph contract."""

    @property
    def hf_model_class(self) -> str:
        return self.config.get("architectures", [""])[0]

    def gguf_refusal(self) -> GGUFRefusal | None:
        """Why this model's vision side has no llama.cpp form (None: it has one, see gguf_plan)."""
        return None

    def gguf_plan(self) -> GGUFPlan | None:
        """The mmproj GGUF's projector, tensors and keys (None: the family has no llama.cpp projector)."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"family": self.name, "model_type": self.config.get("model_type"), "prompt_style": self.prompt_style}
