"""Image datasets by Hugging Face name (``hf:ylecun/mnist``) or local dataset directory, for the
command line. Rows are streamed, so a calibration set of 1,000 images never downloads the
whole dataset; images are decoded, resized and normalized as image folders are."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from starfish_plugin.cli.image_folders import (
    ImageFolderError,
    Normalization,
    image_batches,
    images_to_tensor,
    import_datasets,
)

PREFIX = "hf:"
SHUFFLE_BUFFER = 10_000


def is_hub_source(source: str) -> bool:
    """Whether a ``--calibration`` / ``--eval`` argument names a Hugging Face dataset."""
    return source.startswith(PREFIX)


def _find_column(features: Any, first_row: dict[str, Any], kind: str) -> str | None:
    """The first column holding images (``kind="image"``) or class labels (``kind="label"``)."""
    import datasets

    if features is not None:
        wanted = datasets.Image if kind == "image" else datasets.ClassLabel
        for name, feature in features.items():
            if isinstance(feature, wanted):
                return name
    if kind == "image":
        return next((k for k, v in first_row.items() if isinstance(v, dict) and ("bytes" in v or "path" in v)), None)
    return next((k for k in ("label", "labels") if k in first_row), None)


def _rows(ds: Any, limit: int | None, where: str) -> Iterator[dict[str, Any]]:
    """The first ``limit`` rows of a streamed dataset; a lost connection becomes a clear error."""
    try:
        yield from itertools.islice(iter(ds), limit)
    except (ConnectionError, OSError) as exc:
        raise ImageFolderError(
            f"reading {where} failed while streaming ({type(exc).__name__}: {exc}); run where the Hub is "
            "reachable, or download it there and pass the local copy"
        ) from exc


def _encoded(cell: dict[str, Any], name: str) -> bytes:
    """The encoded image in an undecoded ``Image`` cell: its bytes, or the file it points to
    (local or remote, opened through ``datasets``' own ``xopen``)."""
    if cell.get("bytes"):
        return cell["bytes"]
    from datasets.utils.file_utils import xopen

    try:
        with xopen(cell["path"], "rb") as handle:
            return handle.read()
    except (ConnectionError, OSError) as exc:
        raise ImageFolderError(f"cannot fetch image {name} from {cell['path']} ({type(exc).__name__}: {exc})") from exc


def load_hub_images(
    source: str,
    split: str,
    image_size: int | None,
    channels: int = 3,
    normalize: Normalization = "imagenet",
    limit: int | None = None,
    labeled: bool = False,
    seed: int = 0,
    config_name: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    batch_size: int | None = None,
) -> tuple[torch.Tensor | Iterator[torch.Tensor], torch.Tensor | None, list[str]]:
    """Images of split ``split`` of the dataset ``source`` (``hf:<name or local dataset dir>``).

    With ``limit``, the first ``limit`` rows out of a seeded shuffle buffer of 10,000 rows are
    taken (streamed: about ``10,000 + limit`` rows are read, from the first shards in a shuffled
    shard order, not the whole dataset; not a uniform draw when shards are sorted by class). Image and label columns are
    found from the dataset's features unless named. With ``batch_size`` (unlabeled only), rows
    are fetched and decoded lazily and an iterator of batches is returned instead of a tensor.

    Returns:
        ``[N, C, S, S]`` images, labels (if ``labeled``) and class names (if the dataset has them).
    """
    name = source[len(PREFIX):] if is_hub_source(source) else source
    datasets = import_datasets()
    where = f"dataset {name!r}" + (f" (config {config_name!r})" if config_name else "")
    try:
        ds = datasets.load_dataset(name, config_name, split=split, streaming=True)
    except ConnectionError as exc:
        raise ImageFolderError(
            f"cannot reach {where} on the Hugging Face Hub ({exc}); run where the Hub is reachable, or download "
            "it there and pass the local copy (an image folder, or hf:<local dataset directory>)"
        ) from exc
    except (FileNotFoundError, ValueError) as exc:  # unknown name, split or config
        raise ImageFolderError(f"cannot load split {split!r} of {where}: {exc}") from exc
    first = next(_rows(ds, 1, where), None)  # the first row only, to find the columns
    if first is None:
        raise ImageFolderError(f"split {split!r} of {where} has no rows")
    features = ds.features
    image_column = image_column or _find_column(features, first, "image")
    if image_column is None or image_column not in first:
        raise ImageFolderError(
            f"{where} has no image column {image_column or ''} (columns: {sorted(first)}); name it with --image-column"
        )
    if labeled:
        label_column = label_column or _find_column(features, first, "label")
        if label_column is None or label_column not in first:
            raise ImageFolderError(
                f"{where} has no label column {label_column or ''} (columns: {sorted(first)}); "
                "name it with --label-column"
            )
    ds = ds.cast_column(image_column, datasets.Image(decode=False))
    if limit is not None:
        ds = ds.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
    label = "image {} of the shuffled draw from" if limit is not None else "row {} of"
    advice = f"check that --image-column names the image column of {where}"

    def items(rows: Iterable[dict[str, Any]]) -> Iterator[tuple[bytes, str]]:
        for i, row in enumerate(rows):
            here = f"{label.format(i)} {name}[{split}]"
            yield _encoded(row[image_column], here), here

    if batch_size is not None and not labeled:
        return (
            image_batches(items(_rows(ds, limit, where)), image_size, channels, normalize, batch_size, advice),
            None,
            [],
        )
    taken = list(_rows(ds, limit, where))
    images = images_to_tensor(items(taken), image_size, channels, normalize, advice)
    labels: torch.Tensor | None = None
    names: list[str] = []
    if labeled:
        assert label_column is not None  # found or named when labeled (checked above)
        labels = torch.tensor([int(row[label_column]) for row in taken])
        if features is not None and isinstance(features.get(label_column), datasets.ClassLabel):
            names = list(features[label_column].names)
    return images, labels, names
