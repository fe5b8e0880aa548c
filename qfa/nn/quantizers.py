"""Banks of bquant quantizers: one per bit-width, so every bit-width keeps its own learned parameters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

from torch import nn

from bquant_kernels import BatchQuantizer, LSQQuantizer, lsq_quantize_weights

from ..space import FULL_PRECISION, HEAD_MIN_BITS


def bank_bits(bits_list: Iterable[int]) -> tuple[int, ...]:
    """Bit-widths that get a quantizer: every option except 32, plus 8 (published layout: 2, 3, 4, 8)."""
    return tuple(sorted({b for b in bits_list if b != FULL_PRECISION} | {HEAD_MIN_BITS}))


def weight_bank(bits: Iterable[int], backend: str | None) -> nn.ModuleDict:
    """``{str(b): LSQQuantizer(b)}`` (signed, per-tensor step)."""
    return nn.ModuleDict({str(b): LSQQuantizer(b, signed=True, backend=backend) for b in bits})


def activation_bank(bits: Iterable[int], backend: str | None) -> nn.ModuleDict:
    """``{str(b): BatchQuantizer(b)}`` (unsigned grid; the zero point covers negative ranges, spec 1.6)."""
    return nn.ModuleDict({str(b): BatchQuantizer(b, signed=False, backend=backend) for b in bits})


def bank_key(bank: nn.ModuleDict, bits: int, what: str) -> str | None:
    """Key of ``bits`` in ``bank`` (``None`` for 32 = not quantized); a clear error when it has none."""
    if bits == FULL_PRECISION:
        return None
    key = str(bits)
    if key not in bank:
        have = sorted(int(k) for k in bank.keys())
        raise ValueError(f"{what}={bits}: this layer has quantizers for {have} (and 32 = not quantized)")
    return key


class BackendOwner(nn.Module):
    """Base of a quantized network: ``backend``, the bquant_kernels backend of every quantizer it
    holds (``None``: the fastest available), is one name owned by the network. Setting it points each
    quantizer at it; nothing else stores a copy (a quantizer runs with its own ``backend`` attribute,
    bquant_kernels' module API, which only this setter and the copy into a static layer write)."""

    _backend: str | None = None

    @property
    def backend(self) -> str | None:
        return self._backend

    @backend.setter
    def backend(self, name: str | None) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"backend must be a backend name or None, got {name!r}")
        self._backend = name
        for m in self.modules():
            if isinstance(m, (BatchQuantizer, LSQQuantizer)):
                m.backend = name


@contextlib.contextmanager
def quantized_weights(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Quantize the weights of ``layers`` (dynamic layers with ``weight_for_quantization``) together,
    in one multi-tensor LSQ op (:func:`bquant_kernels.lsq_quantize_weights`) instead of one per layer;
    inside the block each layer's forward uses its result. The numbers are those of the per-layer
    quantization (a step's gradient up to float32 summation order); what it saves is one op, and so
    one kernel launch each way on the GPU, per layer and subnet.
    """
    picked, weights, quantizers, full_weights = [], [], [], []
    for layer in layers:
        item = layer.weight_for_quantization()
        if item is not None:
            picked.append(layer)
            weights.append(item[0])
            quantizers.append(item[1])
            full_weights.append(item[2])
    try:
        for layer, wq in zip(picked, lsq_quantize_weights(quantizers, weights, full_weights), strict=True):
            layer._w_quantized = wq
        yield
    finally:
        for layer in picked:
            layer._w_quantized = None
