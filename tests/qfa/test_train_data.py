"""qfa.data: the digits/synthetic/ImageFolder loaders, deterministic augmentation, resume, sharding."""

from __future__ import annotations

import itertools

import pytest
import torch

from qfa import data as qdata

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(loader, epoch=0, start=0, n=None):
    loader.set_epoch(epoch, start)
    return [(x.clone(), y.clone()) for x, y in itertools.islice(loader, n)]


def test_parse_resolutions():
    assert qdata.parse_resolutions("128:224:4") == tuple(range(128, 225, 4))
    assert qdata.parse_resolutions("32,24, 28") == (24, 28, 32)
    assert qdata.parse_resolutions(40) == (40,)
    assert qdata.parse_resolutions([32, 16, 32]) == (16, 32)
    for bad in ("224:128:4", "a,b", "", "4,8", "1:2:0"):
        with pytest.raises(ValueError, match="resolutions"):
            qdata.parse_resolutions(bad)


def test_resize_on_device():
    x = torch.randn(2, 3, 32, 32)
    assert qdata.resize(x, 32) is x
    y = qdata.resize(x, 24)
    assert y.shape == (2, 3, 24, 24)
    # antialiased bilinear shrink of a constant image stays constant
    c = torch.full((1, 3, 32, 32), 0.7)
    torch.testing.assert_close(qdata.resize(c, 20), torch.full((1, 3, 20, 20), 0.7))


def test_digits_split_and_normalisation():
    train, val = qdata.build_loaders("digits", batch_size=64, resolution=32)
    assert len(train.dataset) == 1500 and len(val.dataset) == qdata.DIGITS_VAL_SIZE
    assert train.num_classes == 10 and len(train) == 1500 // 64  # drop_last
    assert len(val) == -(-qdata.DIGITS_VAL_SIZE // 64)  # every val image, once
    # disjoint split: no val image equals a train image
    tr = train.dataset.base.images.flatten(1).float()
    va = val.dataset.base.images.flatten(1).float()
    assert torch.cdist(va, tr).min() > 0
    # stratified: every class in val
    assert set(val.dataset.base.labels.tolist()) == set(range(10))
    x, y = next(iter(val))
    assert x.dtype == torch.float32 and x.shape == (64, 3, 32, 32) and y.dtype == torch.int64
    # ImageNet normalisation of uint8 images: background 0 maps to -mean/std
    expected_bg = torch.tensor([-m / s for m, s in zip(qdata.IMAGENET_MEAN, qdata.IMAGENET_STD, strict=True)])
    torch.testing.assert_close(x.amin(dim=(0, 2, 3)), expected_bg)


def test_augmentation_is_a_function_of_seed_epoch_index():
    train, _ = qdata.build_loaders("digits", batch_size=50, resolution=32, seed=3)
    a = _batches(train, epoch=0, n=6)
    b = _batches(train, epoch=0, n=6)
    c = _batches(train, epoch=1, n=1)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[0][0], c[0][0])  # new shuffle and augmentation each epoch
    # resuming in the middle of an epoch yields exactly the remaining batches
    train.set_epoch(0, 4)
    assert len(train) == 1500 // 50 - 4
    tail = _batches(train, epoch=0, start=4, n=2)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(tail, a[4:], strict=True))
    # the training images really are augmented (not the raw upscaled digits)
    raw = train.dataset.base.images.float()
    assert not any(torch.equal(x, raw[0]) for x in a[0][0])


def test_augmentation_independent_of_workers():
    train0, _ = qdata.build_loaders("digits", batch_size=40, resolution=32, workers=0)
    train2, _ = qdata.build_loaders("digits", batch_size=40, resolution=32, workers=2)
    a, b = _batches(train0, epoch=2, n=3), _batches(train2, epoch=2, n=3)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True))


def test_sharding_is_disjoint_and_complete():
    indices = list(range(103))
    shards = [qdata._KeyedSampler(indices, True, 5, r, 3, drop_last=True) for r in range(3)]
    for s in shards:
        s.set_epoch(4)
    seen = [[i for _, i in s] for s in shards]
    assert len({len(s) for s in seen}) == 1 and len(seen[0]) == 103 // 3
    flat = sum(seen, [])
    assert len(flat) == len(set(flat))
    # evaluation shards cover every sample exactly once, without padding
    val = [qdata._KeyedSampler(indices, False, 0, r, 3, drop_last=False) for r in range(3)]
    assert sorted(i for s in val for _, i in s) == indices


def test_calib_loader_is_a_fixed_subset():
    calib = qdata.calib_loader("digits", batch_size=32, resolution=32, num_batches=3, seed=1)
    a = [x.clone() for x, _ in calib]
    b = [x.clone() for x, _ in calib]
    assert len(a) == 3 and all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    other = [x for x, _ in qdata.calib_loader("digits", batch_size=32, resolution=32, num_batches=3, seed=2)]
    assert not torch.equal(a[0], other[0])
    with pytest.raises(ValueError, match="num_batches"):
        qdata.calib_loader("digits", num_batches=0)


def test_synthetic_is_deterministic():
    train, val = qdata.build_loaders("synthetic", batch_size=8, resolution=16)
    assert train.num_classes == qdata.SYNTHETIC_CLASSES
    x1, y1 = _batches(train)[0]
    x2, y2 = _batches(train)[0]
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (8, 3, 16, 16)
    assert x1.std() > 0.5  # random pixels, not constant


def test_channels_last_batches():
    train, _ = qdata.build_loaders("synthetic", batch_size=4, resolution=16, channels_last=True)
    x, _ = next(iter(train))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_image_folder(tmp_path):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("val", 3)):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (40 + i, 50, 3), dtype=torch.uint8, generator=gen).numpy()
                Image.fromarray(pixels).save(d / f"{i}.png")
    assert qdata.num_classes(str(tmp_path)) == 2
    train, val = qdata.build_loaders(str(tmp_path), batch_size=4, resolution=24, workers=0)
    x, y = next(iter(train))
    assert x.shape == (4, 3, 24, 24) and set(y.tolist()) <= {0, 1}
    xs = [x for x, _ in val]
    assert sum(len(x) for x in xs) == 6 and xs[0].shape[-1] == 24
    with pytest.raises(FileNotFoundError, match="ImageFolder"):
        qdata.build_loaders(str(tmp_path / "missing"), batch_size=4, resolution=24)


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        qdata.build_loaders("digits", batch_size=0, resolution=32)
    with pytest.raises(ValueError, match="fewer training images"):
        qdata.build_loaders("digits", batch_size=5000, resolution=32)
    with pytest.raises(RuntimeError, match="not initialized"):
        qdata.build_loaders("digits", batch_size=8, resolution=32, distributed=True)
