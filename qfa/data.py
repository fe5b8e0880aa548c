"""Data for training and evaluating the supernet: ImageFolder trees, the bundled digits demo, synthetic.

Design (why it looks like this):

- Workers only decode, crop and augment, and hand over ``uint8`` images (4x less to copy than
  float32); conversion to float, ImageNet normalisation and the memory format happen on the device
  (:class:`DeviceLoader`).
- Training batches are cropped once at the largest resolution; the trainer resizes them on the device
  to each subnet's resolution (:func:`resize`), so one batch serves every subnet of a step.
- Augmentation is a pure function of ``(seed, epoch, sample index)``: the sampler hands the epoch to
  the dataset with every index, and each sample runs its transform under its own seed. Batches are
  therefore identical for any number of workers, and a run resumed in the middle of an epoch sees
  exactly the batches an uninterrupted run would have seen.
- Under ``torch.distributed`` every loader shards with a :class:`~torch.utils.data.DistributedSampler`.

Public API (docs/qfa-api.md): :func:`build_loaders`, :func:`calib_loader`; also :func:`num_classes`,
:func:`parse_resolutions`, :func:`resize`.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DIGITS = "digits"
SYNTHETIC = "synthetic"
DIGITS_VAL_SIZE = 297  # fixed stratified held-out split of the 1,797 images (1,500 train)
SYNTHETIC_SIZES = (10_000, 1_000)  # train, val
SYNTHETIC_CLASSES = 1000


# ----------------------------------------------------------------------------- helpers


def parse_resolutions(spec: str | int | Sequence[int]) -> tuple[int, ...]:
    """Resolutions from ``"128:224:4"`` (inclusive range), ``"24,28,32"``, an int or a sequence; sorted."""
    if isinstance(spec, int):
        values: list[int] = [spec]
    elif isinstance(spec, str):
        text = spec.strip()
        try:
            if ":" in text:
                lo, hi, step = (int(v) for v in text.split(":"))
                if step <= 0 or hi < lo:
                    raise ValueError
                values = list(range(lo, hi + 1, step))
            else:
                values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ValueError(
                f"resolutions must be 'MIN:MAX:STEP' (e.g. 128:224:4) or a comma list (e.g. 24,28,32), got {spec!r}"
            ) from None
    else:
        values = [int(v) for v in spec]
    if not values or min(values) < 8:
        raise ValueError(f"resolutions must be non-empty and each >= 8 px, got {spec!r}")
    return tuple(sorted(set(values)))


def resize(images: Tensor, resolution: int) -> Tensor:
    """Square-resize a float batch ``(N, C, H, W)`` on its device (bilinear, antialiased when shrinking)."""
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    shrink = resolution < images.shape[-1]
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=shrink)


def _dist_rank_world(distributed: bool | None) -> tuple[int, int]:
    initialized = dist.is_available() and dist.is_initialized()
    if distributed and not initialized:
        raise RuntimeError("distributed=True but torch.distributed is not initialized (launch with torchrun)")
    if distributed is False or not initialized:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _default_workers(data: str) -> int:
    if data in (DIGITS, SYNTHETIC):
        return 0  # in-memory / generated: worker start-up costs more than it saves
    return min(8, os.cpu_count() or 1)


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    # A fixed mixing of the three integers (not Python's hash(), which is salted for strings).
    return (seed * 1_000_003 + epoch) * 2_147_483_629 + index & 0x7FFF_FFFF_FFFF_FFFF


# ----------------------------------------------------------------------------- datasets


class DigitsImages(Dataset):
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) upscaled to ``resolution`` px,
    as 3-channel ``uint8`` tensors, with a fixed stratified split (1,500 train / 297 val)."""

    def __init__(self, split: str, resolution: int = 32) -> None:
        from sklearn.datasets import load_digits  # lazy: scikit-learn only for the digits demo
        from sklearn.model_selection import train_test_split

        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        digits = load_digits()
        images = torch.from_numpy(digits.images).float().div_(16.0)  # (N, 8, 8) in [0, 1]
        labels = torch.from_numpy(digits.target).long()
        train_idx, val_idx = train_test_split(
            torch.arange(len(labels)).numpy(), test_size=DIGITS_VAL_SIZE, stratify=labels.numpy(), random_state=0
        )
        idx = torch.from_numpy(train_idx if split == "train" else val_idx)
        up = F.interpolate(images[idx, None], size=(resolution, resolution), mode="bilinear", align_corners=False)
        self.images = up.clamp_(0, 1).mul_(255).round_().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
        self.labels = labels[idx]
        self.classes = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])


class SyntheticImages(Dataset):
    """Random ``uint8`` images with random labels, generated per index (for benchmarks and tests)."""

    def __init__(self, size: int, resolution: int, num_classes: int = SYNTHETIC_CLASSES, seed: int = 0) -> None:
        self.size, self.resolution, self.seed = size, resolution, seed
        self.classes = [str(c) for c in range(num_classes)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        g = torch.Generator().manual_seed(_sample_seed(self.seed, -1, i))
        image = torch.randint(0, 256, (3, self.resolution, self.resolution), dtype=torch.uint8, generator=g)
        return image, int(torch.randint(0, len(self.classes), (), generator=g))


class _Transformed(Dataset):
    """Applies ``transform`` to the images of ``base``; random transforms run under a per-sample seed.

    Indices are ``(epoch, index)`` keys from :class:`_KeyedSampler`, so the augmentation of a sample
    depends only on ``(seed, epoch, index)``.
    """

    def __init__(self, base: Dataset, transform: Callable | None, seed: int, random: bool) -> None:
        self.base, self.transform, self.seed, self.random = base, transform, seed, random

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        epoch, index = key
        image, label = self.base[index]
        if self.transform is None:
            return image, label
        if not self.random:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_sample_seed(self.seed, epoch, index))
            return self.transform(image), label


# ----------------------------------------------------------------------------- samplers


class _KeyedSampler(Sampler):
    """Yields ``(epoch, index)`` keys over a list of dataset indices (see :class:`_Transformed`).

    Training: a :class:`DistributedSampler` permutation (seeded by ``seed + epoch``, sharded by rank),
    started at ``start`` so that a resumed run skips the batches it has already trained on.
    Evaluation (``shuffle=False``): the rank's strided shard, without the padding DistributedSampler
    adds, so every sample is counted exactly once.
    """

    def __init__(self, indices: Sequence[int], shuffle: bool, seed: int, rank: int, world: int, drop_last: bool):
        self.indices = list(indices)
        self.shuffle, self.rank, self.world = shuffle, rank, world
        self.epoch, self.start = 0, 0
        self._dist = None
        if shuffle:
            self._dist = DistributedSampler(
                self.indices, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=drop_last
            )

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start
        if self._dist is not None:
            self._dist.set_epoch(epoch)

    def _positions(self) -> Iterator[int]:
        if self._dist is not None:
            return iter(self._dist)
        return iter(range(self.rank, len(self.indices), self.world))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for pos in itertools.islice(self._positions(), self.start, None):
            yield self.epoch, self.indices[pos]

    def __len__(self) -> int:
        full = len(self._dist) if self._dist is not None else len(range(self.rank, len(self.indices), self.world))
        return max(0, full - self.start)


# ----------------------------------------------------------------------------- device loader


class DeviceLoader:
    """Iterates ``(images, labels)`` on ``device``: float32, ImageNet-normalised, NCHW (optionally
    channels_last). Wraps a :class:`~torch.utils.data.DataLoader` of ``uint8`` images.

    ``set_epoch(epoch, start_batch)`` picks the epoch's shuffle and augmentation and skips the
    first ``start_batch`` batches (resume in the middle of an epoch).
    """

    def __init__(
        self,
        loader: DataLoader,
        sampler: _KeyedSampler,
        device: torch.device,
        num_classes: int,
        resolution: int,
        channels_last: bool = False,
    ) -> None:
        self.loader, self.sampler, self.device = loader, sampler, device
        self.num_classes, self.resolution, self.channels_last = num_classes, resolution, channels_last
        self.batch_size = loader.batch_size
        self.dataset = loader.dataset
        shape = (1, 3, 1, 1)
        self._shift = torch.tensor([255.0 * m for m in IMAGENET_MEAN], device=device).view(shape)
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in IMAGENET_STD], device=device).view(shape)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch * (self.batch_size or 1))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        non_blocking = self.device.type == "cuda"
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=non_blocking)
            labels = labels.to(self.device, non_blocking=non_blocking)
            x = (images.float() - self._shift) * self._scale
            yield x.contiguous(memory_format=fmt), labels


# ----------------------------------------------------------------------------- builders


def num_classes(data: str) -> int:
    """Number of classes of a data source (the folders under ``PATH/train`` for an ImageFolder tree)."""
    if data == DIGITS:
        return 10
    if data == SYNTHETIC:
        return SYNTHETIC_CLASSES
    return len(_image_folder(data, "train").classes)


def _image_folder(root: str, split: str):
    from torchvision.datasets import ImageFolder  # lazy: torchvision only for ImageFolder data

    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"data={root!r}: expected an ImageFolder tree with {split}/<class>/<image> under it, but {path!r} "
            "does not exist (or use data='digits' / 'synthetic')"
        )
    return ImageFolder(path)


def _check_same_classes(data: str, train: Sequence[str], val: Sequence[str]) -> None:
    """Labels are positions in a split's sorted class list: both splits must list the same class names,
    or every held-out label would point at another class."""
    if list(train) == list(val):
        return
    missing, extra = sorted(set(train) - set(val)), sorted(set(val) - set(train))
    raise ValueError(
        f"data={data!r}: val/ and train/ must have the same class folders; val/ lacks {missing or 'none'}, "
        f"val/ has extra {extra or 'none'}"
    )


def _transforms(data: str, split: str, resolution: int) -> tuple[Callable | None, bool]:
    """The transform of a split (returns ``uint8`` CHW tensors) and whether it is random."""
    from torchvision.transforms import v2  # lazy: torchvision only for augmented data (not synthetic)

    if data == SYNTHETIC:
        return None, False
    if data == DIGITS:
        if split == "val":
            return None, False
        # Handwriting: small shifts, rotations and zooms; no flips (a mirrored 2 is not a 2).
        return v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)), True
    if split == "val":
        resize_to = int(math.ceil(resolution / 0.875))
        return v2.Compose([v2.Resize(resize_to, antialias=True), v2.CenterCrop(resolution), v2.PILToTensor()]), False
    # The published augmentation (spec 5).
    train = v2.Compose(
        [
            v2.RandomResizedCrop(resolution, scale=(0.08, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=32.0 / 255.0, saturation=0.5),
            v2.PILToTensor(),
        ]
    )
    return train, True


def _base_dataset(data: str, split: str, resolution: int, seed: int) -> Dataset:
    if data == DIGITS:
        return DigitsImages(split, resolution)
    if data == SYNTHETIC:
        size = SYNTHETIC_SIZES[0] if split == "train" else SYNTHETIC_SIZES[1]
        return SyntheticImages(size, resolution, seed=seed + (0 if split == "train" else 1))
    return _image_folder(data, split)


def _make_loader(
    dataset: Dataset,
    indices: Sequence[int],
    *,
    batch_size: int,
    shuffle: bool,
    drop_last: bool,
    workers: int,
    seed: int,
    distributed: bool | None,
    device: torch.device,
    num_classes: int,
    resolution: int,
    channels_last: bool,
) -> DeviceLoader:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    rank, world = _dist_rank_world(distributed)
    sampler = _KeyedSampler(indices, shuffle, seed, rank, world, drop_last)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        # Its own generator: creating an iterator must not consume the global torch RNG (exact resume).
        generator=torch.Generator().manual_seed(seed),
    )
    return DeviceLoader(loader, sampler, device, num_classes, resolution, channels_last)


def _loader_settings(
    data: str,
    workers: int | None,
    seed: int,
    distributed: bool | None,
    device: torch.device | str,
    num_classes: int,
    resolution: int,
    channels_last: bool,
) -> dict[str, Any]:
    """What every loader of one data set shares (:func:`_make_loader`'s keyword arguments)."""
    workers = _default_workers(data) if workers is None else workers
    return {"workers": workers, "seed": seed, "distributed": distributed, "device": torch.device(device),
            "num_classes": num_classes, "resolution": resolution, "channels_last": channels_last}  # fmt: skip


def build_loaders(
    data: str = DIGITS,
    batch_size: int = 64,
    resolution: int = 224,
    workers: int | None = None,
    distributed: bool | None = None,
    seed: int = 0,
    *,
    device: torch.device | str = "cpu",
    val_batch_size: int | None = None,
    channels_last: bool = False,
) -> tuple[DeviceLoader, DeviceLoader]:
    """The training and validation loaders of ``data``.

    Args:
        data: ``"digits"`` (the bundled demo), ``"synthetic"``, or an ImageFolder root with
            ``train/`` and ``val/``.
        batch_size: images per batch per process.
        resolution: training crops are made at this size (the largest subnet resolution); validation
            images are resized to ``resolution / 0.875`` and centre-cropped to it.
        workers: loader processes (default: 0 for digits/synthetic, else ``min(8, cpu_count)``).
        distributed: shard across ``torch.distributed`` ranks (default: when it is initialised).
        seed: shuffle and augmentation seed (all ranks must pass the same).
        device: where batches are delivered (float32, normalised).
        val_batch_size: default ``batch_size``.
        channels_last: deliver channels_last batches.

    The training loader shuffles, drops the last partial batch, and must be told the epoch with
    ``set_epoch(epoch, start_batch=0)``.
    """
    train_base = _base_dataset(data, "train", resolution, seed)
    val_base = _base_dataset(data, "val", resolution, seed)
    _check_same_classes(data, train_base.classes, val_base.classes)  # type: ignore[attr-defined]
    classes = len(train_base.classes)  # type: ignore[attr-defined]
    train_tf, train_random = _transforms(data, "train", resolution)
    val_tf, _ = _transforms(data, "val", resolution)
    common = _loader_settings(data, workers, seed, distributed, device, classes, resolution, channels_last)
    train = _make_loader(
        _Transformed(train_base, train_tf, seed, train_random),
        range(len(train_base)),  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        **common,
    )
    if len(train) == 0:
        raise ValueError(f"data={data!r}: fewer training images per process than batch_size={batch_size}")
    val = _make_loader(
        _Transformed(val_base, val_tf, seed, False),
        range(len(val_base)),  # type: ignore[arg-type]
        batch_size=val_batch_size or batch_size,
        shuffle=False,
        drop_last=False,
        **common,
    )
    return train, val


def calib_loader(
    data: str = DIGITS,
    batch_size: int = 64,
    resolution: int = 224,
    num_batches: int = 30,
    workers: int | None = None,
    distributed: bool | None = None,
    seed: int = 0,
    *,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> DeviceLoader:
    """The recalibration loader (spec 3): ``num_batches`` batches per process of augmented training
    images from a fixed random subset; the same images and augmentation on every pass."""
    if num_batches <= 0:
        raise ValueError(f"num_batches must be positive, got {num_batches}")
    base = _base_dataset(data, "train", resolution, seed)
    _, world = _dist_rank_world(distributed)
    wanted = min(len(base), num_batches * batch_size * world)  # type: ignore[arg-type]
    subset = torch.randperm(len(base), generator=torch.Generator().manual_seed(seed + 7919))[:wanted]  # type: ignore[arg-type]
    tf, random = _transforms(data, "train", resolution)
    return _make_loader(
        _Transformed(base, tf, seed + 1, random),
        sorted(subset.tolist()),
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        **_loader_settings(data, workers, seed, distributed, device, len(base.classes), resolution, channels_last),  # type: ignore[attr-defined]
    )
