"""Image loading and the numpy/PIL building blocks of every family's preprocessing.

The runtime must not need torch or transformers, so preprocessing is re-implemented here and
checked against the checkpoint's own HF processor in the tests. To match HF bit for bit the
steps keep HF's order and dtypes: RGB uint8 -> PIL resize on uint8 -> crop/split ->
rescale in float64 then cast to float32 -> normalize in float32.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageError

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]

# Smaller images carry no visual content; every family would only upsample interpolation noise,
# and the aspect-ratio arithmetic of the Idefics resizers degenerates on them.
MIN_IMAGE_SIDE = 4

PIL_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX, 5: Image.HAMMING}


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """PIL image of any mode -> HxWx3 uint8. Alpha is composited onto white (as HF does);
    16-bit and 32-bit integer images are scaled to 8 bits instead of being clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if arr.dtype.kind == "f":
            hi = 1.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 255.0
            arr8 = np.clip(np.nan_to_num(arr) / hi * 255.0, 0, 255).round().astype(np.uint8)
        else:
            hi = 65535.0 if arr.size and int(arr.max()) > 255 else 255.0
            arr8 = np.clip(arr.astype(np.float64) / hi * 255.0, 0, 255).round().astype(np.uint8)
        return np.repeat(arr8[:, :, None], 3, axis=2)
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.array(img.convert("RGB"))


def _array_to_rgb(arr: np.ndarray, index: int | None) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ImageError(f"array of shape {arr.shape} is not an image (want HxW, HxWx3 or HxWx4)", index=index)
    if arr.dtype == np.uint8:
        a8 = arr
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ImageError("float image contains NaN or inf", index=index)
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        a8 = np.clip(arr * scale, 0, 255).round().astype(np.uint8)
    elif arr.dtype.kind in "ui":
        hi = 65535.0 if arr.max(initial=0) > 255 else 255.0
        a8 = np.clip(arr.astype(np.float64) / hi * 255.0, 0, 255).round().astype(np.uint8)
    elif arr.dtype == np.bool_:
        a8 = arr.astype(np.uint8) * 255
    else:
        raise ImageError(f"unsupported array dtype {arr.dtype}", index=index)
    if a8.ndim == 2:
        return np.repeat(a8[:, :, None], 3, axis=2)
    if a8.shape[-1] == 4:
        return _to_rgb_array(Image.fromarray(np.ascontiguousarray(a8), mode="RGBA"))
    return np.ascontiguousarray(a8)


def load_image(src: ImageInput, index: int | None = None) -> np.ndarray:
    """Any supported image input -> HxWx3 uint8 RGB array. Raises ImageError naming the image."""
    source = None
    if isinstance(src, (str, os.PathLike)):
        source = str(src)
        path = Path(src)
        try:
            is_dir, is_file = path.is_dir(), path.is_file()
        except OSError as exc:  # e.g. a name over the filesystem's 255 characters (ENAMETOOLONG)
            raise ImageError(f"cannot open ({exc.strerror})", index=index, source=source) from None
        if is_dir:
            raise ImageError("is a directory, not an image file", index=index, source=source)
        if not is_file:
            raise ImageError("file not found", index=index, source=source)
        try:
            with Image.open(path) as img:
                img.load()  # force the decode now: a truncated file fails here, not later
                rgb = _to_rgb_array(img)
        except Image.DecompressionBombError as exc:  # PIL's guard against a header claiming gigapixels: kept on
            raise ImageError(f"refused as a decompression bomb ({exc})", index=index, source=source) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"cannot decode image file ({exc})", index=index, source=source) from None
    elif isinstance(src, Image.Image):
        try:
            src.load()
            rgb = _to_rgb_array(src)
        except (OSError, ValueError) as exc:
            raise ImageError(f"cannot decode PIL image ({exc})", index=index) from None
    elif isinstance(src, np.ndarray):
        rgb = _array_to_rgb(src, index)
    else:
        raise ImageError(f"unsupported image type {type(src).__name__} (want a path, PIL image or numpy array)", index=index)
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise ImageError(
            f"image is {w}x{h} pixels; the smallest side must be at least {MIN_IMAGE_SIDE} pixels", index=index, source=source
        )
    return rgb


def load_images(images: Sequence[ImageInput]) -> list[np.ndarray]:
    return [load_image(im, index=i) for i, im in enumerate(images)]


# ---- building blocks (all images HxWxC uint8 until rescale) ----

def resize(img: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """PIL resize on uint8, as HF's PIL backend does."""
    out = Image.fromarray(img).resize((int(width), int(height)), resample=PIL_RESAMPLE[int(resample)])
    return np.asarray(out)


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """HF get_resize_output_image_size(default_to_square=False): short side -> size, long keeps ratio."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """HF center_crop, including its zero padding when the crop is larger than the image."""
    oh, ow = img.shape[:2]
    top, left = (oh - height) // 2, (ow - width) // 2
    if top >= 0 and left >= 0 and top + height <= oh and left + width <= ow:
        return img[top:top + height, left:left + width]
    nh, nw = max(height, oh), max(width, ow)
    canvas = np.zeros((nh, nw) + img.shape[2:], dtype=img.dtype)
    tp, lp = math.ceil((nh - oh) / 2), math.ceil((nw - ow) / 2)
    canvas[tp:tp + oh, lp:lp + ow] = img
    top, left = top + tp, left + lp
    return canvas[max(0, top):min(nh, top + height), max(0, left):min(nw, left + width)]


def pad_to_square(img: np.ndarray, background: Sequence[int]) -> np.ndarray:
    h, w = img.shape[:2]
    if h == w:
        return img
    side = max(h, w)
    out = np.empty((side, side, img.shape[2]), dtype=img.dtype)
    out[:, :] = np.asarray(background, dtype=img.dtype)
    if w > h:
        s = (side - h) // 2
        out[s:s + h, :] = img
    else:
        s = (side - w) // 2
        out[:, s:s + w] = img
    return out


@dataclass(frozen=True)
class Normalization:
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_config(cls, cfg: dict[str, Any], default_mean, default_std) -> "Normalization":
        mean = cfg.get("image_mean", default_mean)
        std = cfg.get("image_std", default_std)
        mean = tuple(mean) if isinstance(mean, (list, tuple)) else (mean,) * 3
        std = tuple(std) if isinstance(std, (list, tuple)) else (std,) * 3
        return cls(
            do_rescale=bool(cfg.get("do_rescale", True)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            do_normalize=bool(cfg.get("do_normalize", True)),
            mean=mean,
            std=std,
        )

    def apply(self, img: np.ndarray) -> np.ndarray:
        """HxWxC uint8 -> CxHxW float32, with HF's dtype steps."""
        x = np.moveaxis(img, -1, 0)
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        elif x.dtype != np.float32:
            x = x.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.std, dtype=np.float32)[:, None, None]
            x = (x - mean) / std
        return np.ascontiguousarray(x, dtype=np.float32)


IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def pad_stack(tiles: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """CxHxW float32 tiles of different sizes -> [N,C,Hmax,Wmax] zero-padded bottom/right and the
    [N,Hmax,Wmax] pixel mask (1 = real pixel), as the Idefics processors build them."""
    hmax = max(t.shape[1] for t in tiles)
    wmax = max(t.shape[2] for t in tiles)
    out = np.zeros((len(tiles), tiles[0].shape[0], hmax, wmax), dtype=np.float32)
    mask = np.zeros((len(tiles), hmax, wmax), dtype=np.int64)
    for i, t in enumerate(tiles):
        out[i, :, : t.shape[1], : t.shape[2]] = t
        mask[i, : t.shape[1], : t.shape[2]] = 1
    return out, mask


def sample_images(n: int, seed: int = 0, sizes: list[tuple[int, int]] | None = None) -> list[np.ndarray]:
    """n RGB uint8 images of different sizes (HxW) for checks (verify's prompts, the exporter's
    example inputs, tests), with some structure (gradients and blocks) rather than pure noise, so
    that resampling filters matter."""
    rng = np.random.default_rng(seed)
    sizes = sizes or [(40, 56), (64, 48), (30, 90), (72, 72), (50, 33)]
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 7) % 256], -1)
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        img[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 256, 3)
        img = np.clip(img + rng.integers(-12, 12, img.shape), 0, 255).astype(np.uint8)
        out.append(img)
    return out
