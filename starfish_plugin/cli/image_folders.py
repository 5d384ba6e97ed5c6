"""Image folders for the command line, read through Hugging Face ``datasets``' image-folder loader.

A calibration folder may be flat or hold class subfolders (labels are then ignored); an eval
folder must hold one subfolder per class. Images are converted to RGB (or L for one channel),
resized and center-cropped to one size, and normalized.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from starfish_plugin.errors import ImageFolderError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


# A preset name of NORMALIZATIONS, or (mean, std) per channel (or one value each).
Normalization = str | tuple[tuple[float, ...], tuple[float, ...]]


def _open(source: str | bytes, name: str, mode: str, size: int | None, advice: str) -> Any:
    """A PIL image from a path or encoded bytes, converted to ``mode`` and resized/cropped to ``size``."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode(source, mode, size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageFolderError(
            f"image {name} is too large to decode safely ({exc}); images this large are not calibration images "
            f"(a decompression bomb?): {advice}"
        ) from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageFolderError(f"cannot read image {name} ({type(exc).__name__}: {exc}); {advice}") from exc


def _decode(source: str | bytes, mode: str, size: int | None) -> Any:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image = image.convert(mode)
        if size is not None:
            scale = size / min(image.size)
            w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((w, h), Image.Resampling.BILINEAR)
            left, top = (w - size) // 2, (h - size) // 2
            image = image.crop((left, top, left + size, top + size))
        return image


SIZE_HINT = "pass --image-size to resize and center-crop them to one size"


def image_batches(
    items: Iterable[tuple[str | bytes, str]],
    image_size: int | None,
    channels: int,
    normalize: Normalization,
    batch_size: int,
    advice: str = "remove or replace it",
) -> Iterator[torch.Tensor]:
    """Decode ``(path or bytes, name)`` items lazily into normalized ``[B, C, S, S]`` batches; all
    images must have one size unless ``image_size`` resizes them. ``advice`` ends the error for
    an unreadable image."""
    mode = "L" if channels == 1 else "RGB"
    mean, std = NORMALIZATIONS[normalize] if isinstance(normalize, str) else normalize
    if len(mean) == 1:
        mean, std = mean * channels, std * channels
    mean_t = torch.tensor(mean[:channels]).view(-1, 1, 1)
    std_t = torch.tensor(std[:channels]).view(-1, 1, 1)
    images, first = [], None
    for source, name in items:
        image = _open(source, name, mode, image_size, advice)
        if first is None:
            first = (name, image.size)
        elif image.size != first[1]:
            raise ImageFolderError(
                f"images have different sizes ({first[0]}: {first[1]}, {name}: {image.size}); {SIZE_HINT}"
            )
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        x = x.view(image.height, image.width, channels).permute(2, 0, 1).float() / 255
        images.append((x - mean_t) / std_t)
        if len(images) == batch_size:
            yield torch.stack(images)
            images = []
    if images:
        yield torch.stack(images)


def images_to_tensor(
    items: Iterable[tuple[str | bytes, str]],
    image_size: int | None,
    channels: int,
    normalize: Normalization,
    advice: str = "remove or replace it",
) -> torch.Tensor:
    """``image_batches`` gathered into one ``[N, C, S, S]`` tensor."""
    return torch.cat(list(image_batches(items, image_size, channels, normalize, 256, advice)))


def import_datasets():
    """Hugging Face ``datasets`` (the ``cli`` extra), progress bars off."""
    from starfish_plugin.extras import need

    datasets = need("datasets", "reading images (image folders and hf:<dataset>)")
    datasets.disable_progress_bars()
    return datasets


def load_image_folder(
    folder: str | os.PathLike,
    image_size: int | None,
    channels: int = 3,
    normalize: Normalization = "imagenet",
    limit: int | None = None,
    labeled: bool = False,
    seed: int = 0,
    batch_size: int | None = None,
) -> tuple[torch.Tensor | Iterator[torch.Tensor], torch.Tensor | None, list[str]]:
    """Images of ``folder`` as a ``[N, C, S, S]`` float tensor (and labels and class names if ``labeled``).

    Args:
        image_size: resize (shorter side) and center-crop to this size; ``None`` keeps the sizes,
            which must then all be equal.
        normalize: a preset name of ``NORMALIZATIONS`` or ``(mean, std)`` per channel (or one value).
        limit: take this many images, drawn at random with ``seed`` (all when ``None``).
        batch_size: decode lazily and return an iterator of batches of this size instead.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageFolderError(f"image folder {folder} does not exist")
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*") if p.is_file()):
        raise ImageFolderError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    datasets = import_datasets()
    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    ds = ds.cast_column("image", datasets.Image(decode=False))
    names = ds.features["label"].names if "label" in ds.features else []
    if labeled and len(names) < 2:
        raise ImageFolderError(f"the eval folder {folder} needs one subfolder per class (found {len(names)} classes)")
    order = list(range(len(ds)))
    if limit is not None and limit < len(ds):
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:limit].sort().values.tolist()
    rows = [ds[i] for i in order]
    paths = [row["image"]["path"] for row in rows]
    labels = torch.tensor([row["label"] for row in rows]) if labeled else None
    if batch_size is not None:
        return image_batches(zip(paths, paths), image_size, channels, normalize, batch_size), labels, names
    images = images_to_tensor(zip(paths, paths), image_size, channels, normalize)
    return images, labels, names
