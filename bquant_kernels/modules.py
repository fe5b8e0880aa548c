"""``nn.Module`` wrappers: :class:`BatchQuantizer` (activations) and :class:`LSQQuantizer` (weights)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .checks import check_bits
from .gated import gated_batchquant
from .lsq_multi import lsq_multi
from .ops import batchquant, lsq
from .qparams import lsq_grid


class FakeQuantizer(nn.Module):
    """What both quantizers hold: a bit-width (checked against ``BITS``), signedness and a backend name."""

    BITS: tuple[int, int]

    def __init__(self, bits: int, signed: bool, backend: str | None) -> None:
        super().__init__()
        self.bits = check_bits("bits", bits, *self.BITS)
        self.signed = signed
        self.backend = backend

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"


class BatchQuantizer(FakeQuantizer):
    """BatchQuant activation fake-quantizer (spec 1).

    Parameters ``theta`` (raw scale, init 0 so ``l = 1``) and ``offset`` (init 0). Buffer ``lo_hi``
    holds the running range, written only by :func:`bquant_kernels.recalibrate` (never an EMA).
    Training mode quantizes with the batch statistics; eval mode with ``lo_hi``.
    """

    BITS = (2, 8)

    def __init__(self, bits: int, signed: bool = False, backend: str | None = None) -> None:
        super().__init__(bits, signed, backend)
        self.theta = nn.Parameter(torch.zeros(1))
        self.offset = nn.Parameter(torch.zeros(1))
        self.register_buffer("lo_hi", torch.zeros(2))
        self.range_sink = None  # set by bquant_kernels.recalibrate: collects the batch ranges
        # Whether lo_hi holds a range (recalibrated, set, or loaded non-zero): a Python bool, no device sync.
        self.calibrated = False

    def set_range(self, lo_hi: Tensor) -> None:
        """Set the running range ``[lo, hi]`` by hand (normally :func:`bquant_kernels.recalibrate` does)."""
        with torch.no_grad():
            self.lo_hi.copy_(lo_hi)
        self.calibrated = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        loaded = state_dict.get(prefix + "lo_hi")
        if loaded is not None:  # loading is no hot path: one look at the values
            self.calibrated = bool(loaded.ne(0).any())

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        """``x`` fake-quantized; with ``gate`` (one value per sample and channel, a squeeze-excitation's)
        ``x * gate`` in one op (:func:`bquant_kernels.gated_batchquant`)."""
        if not self.training and not self.calibrated and self.range_sink is None:
            raise RuntimeError(
                f"BatchQuantizer(bits={self.bits}) in eval mode was never calibrated (its range is [0, 0]): run "
                "a few batches through bquant_kernels.recalibrate(model) (qfa.calibrate) first, or set_range()"
            )
        sink = self.range_sink
        lo_hi = None if self.training or sink is not None else self.lo_hi
        args = (x, self.theta, self.offset, self.bits)
        kwargs = {"signed": self.signed, "lo_hi": lo_hi, "return_range": sink is not None, "backend": self.backend}
        out = batchquant(*args, **kwargs) if gate is None else gated_batchquant(x, gate, *args[1:], **kwargs)
        if sink is None:
            return out
        y, used = out
        sink.add(used, x.shape[0])
        return y


class LSQQuantizer(FakeQuantizer):
    """LSQ weight fake-quantizer (spec 2).

    The step is initialised on first use to ``2 * mean(|W_full|) / sqrt(Qp)`` from the full shared
    weight. The buffer ``initialized`` is saved in the state dict, so loading a checkpoint never
    re-initialises the step.
    """

    BITS = (1, 8)

    def __init__(self, bits: int, signed: bool = True, backend: str | None = None) -> None:
        super().__init__(bits, signed, backend)
        self.step = nn.Parameter(torch.ones(1))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._initialized = False  # host mirror of the buffer: no sync in forward
        self.register_load_state_dict_post_hook(LSQQuantizer._sync_initialized)

    @staticmethod
    def _sync_initialized(module: LSQQuantizer, _incompatible_keys) -> None:
        module._initialized = bool(module.initialized)

    @torch.no_grad()
    def initialize(self, w_full: Tensor) -> None:
        """Set the step from the full weight (spec 2 convention)."""
        qp = lsq_grid(self.bits, self.signed)[1]
        self.step.copy_(2.0 * w_full.detach().abs().float().mean() / math.sqrt(qp))
        self.initialized.fill_(True)
        self._initialized = True

    def initialize_once(self, w_full: Tensor) -> None:
        """:meth:`initialize` unless the step was initialised already (host flag: no sync)."""
        if not self._initialized:
            self.initialize(w_full)

    def forward(self, w: Tensor, w_full: Tensor | None = None) -> Tensor:
        """Quantize ``w``, a slice of ``w_full`` (default: ``w`` itself) that sets init and gradient scale."""
        full = w if w_full is None else w_full
        self.initialize_once(full)
        return lsq(w, self.step, self.bits, signed=self.signed, numel_full=full.numel(), backend=self.backend)


def lsq_quantize_weights(
    quantizers: Sequence[LSQQuantizer], weights: Sequence[Tensor], full_weights: Sequence[Tensor]
) -> list[Tensor]:
    """``[q(w, w_full=f) for q, w, f in zip(quantizers, weights, full_weights)]``, in one :func:`lsq_multi`
    call per group of quantizers that share backend and signedness (and weights that share device and
    dtype) instead of one op per weight: one kernel launch each way on the cuda backend.

    Forward values and weight gradients are those of the per-quantizer calls, bit for bit; a step's
    gradient is the same sum accumulated in another order (equal up to float32 rounding). Each step is
    initialised on first use from its full weight, as :meth:`LSQQuantizer.forward` does.
    """
    if not len(quantizers) == len(weights) == len(full_weights):
        raise ValueError(
            f"quantizers, weights and full_weights must have one entry each, got "
            f"{len(quantizers)}, {len(weights)} and {len(full_weights)}"
        )
    groups: dict[tuple, list[int]] = {}
    for i, (q, w, full) in enumerate(zip(quantizers, weights, full_weights, strict=True)):
        q.initialize_once(full)
        groups.setdefault((q.backend, q.signed, w.device, w.dtype), []).append(i)
    out: list[Tensor | None] = [None] * len(weights)
    for (backend, signed, _, _), members in groups.items():
        quantized = lsq_multi(
            [weights[i] for i in members],
            [quantizers[i].step for i in members],
            [quantizers[i].bits for i in members],
            signed=signed,
            numel_full=[full_weights[i].numel() for i in members],
            backend=backend,
        )
        for i, wq in zip(members, quantized, strict=True):
            out[i] = wq
    return out
