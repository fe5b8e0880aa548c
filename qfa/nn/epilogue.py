"""A layer's epilogue (BN -> activation (-> + shortcut) -> the next layer's BatchQuant) through the fused op.

:func:`bquant_kernels.epilogue.bn_act_quant` in the modes of the modules it replaces: BN with batch
statistics in training and while calibrating (its ``stats_sink`` then gets the batch mean and biased
variance), running statistics in evaluation; the quantizer with the batch range in training (its
``range_sink`` gets the range while recalibrating), its stored ``lo_hi`` in evaluation.
"""

from __future__ import annotations

from torch import Tensor

from bquant_kernels import BatchQuantizer
from bquant_kernels.epilogue import bn_act_quant

from .batchnorm import DynamicBatchNorm2d
from .utils import leading


def fused_epilogue(
    y: Tensor,
    bn: DynamicBatchNorm2d,
    act: str | None,
    quantizer: BatchQuantizer | None,
    backend: str | None,
    residual: Tensor | None = None,
    keep_activation: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``quantizer(act(bn(y)) + residual)`` (without quantizer ``act(bn(y)) + residual``) in one op; with
    ``keep_activation`` ``(act(bn(y)) + residual, that quantized)`` (the same tensor twice without quantizer)."""
    c = y.shape[1]
    if c > bn.max_channels:
        raise ValueError(f"input has {c} channels, this BatchNorm holds {bn.max_channels}")
    batch_stats = bn.uses_batch_stats
    range_sink = None if quantizer is None else quantizer.range_sink
    want_stats = bn.stats_sink is not None or range_sink is not None
    keep = keep_activation and quantizer is not None
    q = {}
    if quantizer is not None:
        lo_hi = None if quantizer.training or range_sink is not None else quantizer.lo_hi
        q = {"theta": quantizer.theta, "offset": quantizer.offset, "bits": quantizer.bits,
             "signed": quantizer.signed, "lo_hi": lo_hi}  # fmt: skip
        backend = quantizer.backend
    result = bn_act_quant(
        y, leading(bn.weight, c), leading(bn.bias, c), eps=bn.eps, act=act, residual=residual,
        running_mean=None if batch_stats else leading(bn.running_mean, c),
        running_var=None if batch_stats else leading(bn.running_var, c),
        return_activation=keep, return_stats=want_stats, backend=backend, **q,
    )  # fmt: skip
    outs = result if isinstance(result, tuple) else (result,)
    if want_stats:
        *outs, mean, var, used = outs
        if bn.stats_sink is not None:
            bn.stats_sink.add(mean, var, y.shape[0])
        if range_sink is not None:
            range_sink.add(used, y.shape[0])
    out, kept = outs if keep else (outs[0], outs[0])  # without quantizer the output is the activation
    return (kept, out) if keep_activation else out
