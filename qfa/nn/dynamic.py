"""Dynamic (elastic) quantized layers of the supernet.

Every layer quantizes its input with a BatchQuantizer and its weight with an LSQQuantizer of the
active bit-widths, convolves, then applies BN, activation (and SE) in full precision. The active
width, kernel size and bit-widths are plain attributes set from outside by the network
(``set_active_*``); ``forward`` only reads them, so no module walk or host sync happens per step.
Input channels follow the input tensor (the first ``C`` channels of the weight are used).

A network quantizes the weights of all its active layers at once (``qfa.nn.quantized_weights``: one
multi-tensor LSQ op instead of one per layer); each layer's ``weight_for_quantization`` says what to
quantize, and its ``forward`` takes the result from ``_w_quantized`` when it is set.

A layer keeps no backend of its own: ``backend=`` only initialises its quantizers (for a layer used on
its own); in a network, the network's ``backend`` (:class:`qfa.nn.BackendOwner`) sets them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bquant_kernels import BatchQuantizer, LSQQuantizer
from bquant_kernels.backends import resolve
from bquant_kernels.epilogue import fused_backend
from bquant_kernels.gated import gated_backend

from .batchnorm import DynamicBatchNorm2d
from .epilogue import fused_epilogue
from .quantizers import FULL_PRECISION, activation_bank, bank_key, weight_bank
from .se import DynamicSE, se_mid_channels
from .static import QConv2d, QLinear
from .utils import build_activation, leading, sub_kernel_slice

# ----------------------------------------------------------------------------- copies into static layers


def _copy_bn(dst: DynamicBatchNorm2d, src: DynamicBatchNorm2d, c: int) -> None:
    dst.eps = src.eps
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(dst, name).copy_(getattr(src, name)[:c])


def _copy_se(dst: DynamicSE, src: DynamicSE, c: int) -> None:
    mid = se_mid_channels(c)
    dst.reduce.weight.copy_(src.reduce.weight[:mid, :c])
    dst.reduce.bias.copy_(src.reduce.bias[:mid])
    dst.expand.weight.copy_(src.expand.weight[:c, :mid])
    dst.expand.bias.copy_(src.expand.bias[:c])


def _fill_static(dst: QConv2d | QLinear, src: _ActiveBits, weight: Tensor, w_full: Tensor) -> QConv2d | QLinear:
    """``dst`` (a new static layer) with ``src``'s active state: ``weight`` (the active slice), BN and SE
    (sliced to ``dst``'s output channels) and the learned state and backend of the active quantizers.
    An LSQ step the supernet has not initialised yet gets the value the supernet would give it on first
    use (from the full weight ``w_full``), never a re-initialisation."""
    dst.weight.copy_(weight)
    c = dst.weight.shape[0]
    if getattr(dst, "bn", None) is not None:
        _copy_bn(dst.bn, src.bn, c)
    if getattr(dst, "se", None) is not None:
        _copy_se(dst.se, src.se, c)
    src_w, src_a = src.active_quantizers()
    if dst.w_quantizer is not None:
        if bool(src_w.initialized):
            dst.w_quantizer.load_state_dict(src_w.state_dict())
        else:
            dst.w_quantizer.initialize(w_full)
        dst.w_quantizer.backend = src_w.backend
    if dst.a_quantizer is not None:
        dst.a_quantizer.load_state_dict(src_a.state_dict())
        dst.a_quantizer.backend = src_a.backend
    return dst


def _fuses_on(fused: str, backend: str | None, y: Tensor) -> bool:
    """Whether a fused op whose kernels are ``fused``'s runs for ``y``: only the quantizers' own backend
    (``backend`` resolved for ``y``), and not the CPU kernel in 16 bits, slower there than the separate
    ops (bench/results/README.md)."""
    return fused == resolve(backend, y.device, y.dtype) and not (fused == "cpu" and y.element_size() == 2)


def _finish(
    layer: nn.Module,
    y: Tensor,
    next_quantizer: BatchQuantizer | None,
    residual: Tensor | None = None,
    keep_activation: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``next_quantizer(act(bn(y)) + residual)`` of a conv layer (each part optional), and with
    ``keep_activation`` ``(act(bn(y)) + residual, that quantized)`` (a later shortcut adds the former).
    One fused op when the layer's ``fused_epilogue`` is set and it has BN with batch statistics
    (training, recalibration) and something to fuse with it, else the modules. 16-bit (autocast) fuses
    where the op runs Triton's kernels; the CPU kernel's 16-bit loops are slower than the separate ops
    (bench/results/README.md), so there it keeps the modules. Evaluation keeps the modules, so that a
    supernet and its exported static subnet give the same bits."""
    bn = layer.bn
    fusable = layer.fused_epilogue and bn is not None and bn.uses_batch_stats
    if fusable and (next_quantizer is not None or layer.act_name is not None or residual is not None):
        # The backend of the layer's own input quantizers (qfa.nn.BackendOwner sets them all alike). Fused
        # only where that backend has epilogue kernels of its own: on the cuda backend the op would run
        # Triton's, not measured on a GPU yet (docs/known-issues.md).
        any_quantizer = next(iter(layer._banks()[1].values()), None)
        backend = None if any_quantizer is None else any_quantizer.backend
        if _fuses_on(fused_backend(backend, y), backend, y):
            return fused_epilogue(y, bn, layer.act_name, next_quantizer, backend, residual, keep_activation)
    if bn is not None:
        y = bn(y)
    y = layer.act(y)
    if residual is not None:
        y = y + residual
    q = y if next_quantizer is None else next_quantizer(y)
    return (y, q) if keep_activation else q


def _quantize_se(layer: nn.Module, y: Tensor, quantizer: BatchQuantizer) -> Tensor:
    """``quantizer(layer.se(y))``: SE's gate multiply in the quantizer's op (``gated_batchquant``) where
    :func:`_finish` would fuse (batch statistics, a kernel of the quantizer's own backend, not 16-bit on
    the cpu backend), else the multiply then the quantizer."""
    gate = layer.se.gate(y)
    backend = quantizer.backend
    # Autocast may give the gate another dtype than y: then the product's type promotion decides.
    ok = layer.bn is not None and layer.bn.uses_batch_stats and gate.dtype == y.dtype
    if ok and _fuses_on(gated_backend(backend, y), backend, y):
        return quantizer(y, gate)
    return quantizer(y * gate)


class _ActiveBits:
    """Active weight / activation bit-widths of a layer, and their quantizers in its banks."""

    weight: nn.Parameter
    w_quantizer: nn.ModuleDict
    a_quantizer: nn.ModuleDict
    # This forward's quantized weight rows, set by qfa.nn.quantized_weights (None: quantize here).
    _w_quantized: Tensor | None = None

    def input_quantizer(self) -> BatchQuantizer | None:
        """The active quantizer of this layer's input (None in full precision)."""
        return None if self._a_key is None else self.a_quantizer[self._a_key]

    def _init_bits(self) -> None:
        self.w_bits = FULL_PRECISION
        self.a_bits = FULL_PRECISION
        self._w_key: str | None = None
        self._a_key: str | None = None

    def _active_weight(self, rows: int, cols: int) -> Tensor:
        """``weight[:rows, :cols]`` fake-quantized: this forward's rows from ``quantized_weights`` when
        set, else quantized here (the full weight sets the LSQ init and gradient scale)."""
        if self._w_quantized is not None:
            return leading(self._w_quantized, rows, cols)
        w = leading(self.weight, rows, cols)
        return w if self._w_key is None else self.w_quantizer[self._w_key](w, w_full=self.weight)

    def _banks(self) -> tuple[nn.ModuleDict, nn.ModuleDict]:
        """The (weight, activation) banks the active bit-widths are looked up in."""
        return self.w_quantizer, self.a_quantizer

    def set_active_bits(self, w_bits: int, a_bits: int) -> None:
        w_bank, a_bank = self._banks()
        w_key = bank_key(w_bank, w_bits, "w_bits")
        a_key = bank_key(a_bank, a_bits, "a_bits")
        self.w_bits, self.a_bits, self._w_key, self._a_key = w_bits, a_bits, w_key, a_key

    def active_quantizers(self) -> tuple[LSQQuantizer | None, BatchQuantizer | None]:
        """The (weight, input) quantizers of the active bit-widths (``None`` at 32 bits)."""
        w_bank, a_bank = self._banks()
        return (
            None if self._w_key is None else w_bank[self._w_key],
            None if self._a_key is None else a_bank[self._a_key],
        )


class DynamicQConv2d(_ActiveBits, nn.Module):
    """Quantized dense conv (1x1 pointwise, or the kxk stem) with elastic output width.

    Uses ``weight[:active_out_channels, :C_in]``; the LSQ step sees the full weight for its
    initialisation and gradient scale (``lsq(w_active, w_full=weight)``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        *,
        bn: bool = True,
        act: str | None = None,
        quant_bits: Sequence[int],
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, kernel_size // 2
        self.act_name = act
        self.fused_epilogue = False  # BN + activation (+ the next quantizer) in one op; set by the network
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bn = DynamicBatchNorm2d(out_channels) if bn else None
        self.act = build_activation(act)
        self.w_quantizer = weight_bank(quant_bits, backend)
        self.a_quantizer = activation_bank(quant_bits, backend)
        self.active_out_channels = out_channels
        self._init_bits()

    def forward(
        self,
        x: Tensor,
        next_quantizer: BatchQuantizer | None = None,
        *,
        input_quantized: bool = False,
        residual: Tensor | None = None,
        keep_activation: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``next_quantizer(act(bn(conv(quantize(x)))) + residual)``: ``next_quantizer`` is the next layer's
        input quantizer when its input is exactly this output, ``residual`` a shortcut added to it (both
        fused with BN and activation when ``fused_epilogue``); ``keep_activation``: return
        ``(activation, quantized)`` (a later shortcut needs the former); ``input_quantized``: ``x`` comes
        quantized from the previous layer."""
        c_in = x.shape[1]
        if c_in > self.in_channels:
            raise ValueError(f"input has {c_in} channels, this conv takes at most {self.in_channels}")
        if self._a_key is not None and not input_quantized:
            x = self.a_quantizer[self._a_key](x)
        y = F.conv2d(x, self._active_weight(self.active_out_channels, c_in), None, self.stride, self.padding)
        return _finish(self, y, next_quantizer, residual, keep_activation)

    def weight_for_quantization(self) -> tuple[Tensor, LSQQuantizer, Tensor] | None:
        """``(rows, quantizer, full weight)``: the active output rows of the weight (every input channel:
        quantizing is elementwise, so the input slice can follow), or None in full precision."""
        wq, _ = self.active_quantizers()
        return None if wq is None else (leading(self.weight, self.active_out_channels), wq, self.weight)

    @torch.no_grad()
    def to_static(self, in_channels: int) -> QConv2d:
        """The active layer (``in_channels`` inputs) as a :class:`QConv2d` with copied weights and state."""
        out = self.active_out_channels
        layer = QConv2d(
            in_channels,
            out,
            self.kernel_size,
            self.stride,
            w_bits=self.w_bits,
            a_bits=self.a_bits,
            bn=self.bn is not None,
            act=self.act_name,
        )
        return _fill_static(layer, self, self.weight[:out, :in_channels], self.weight)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"active_out={self.active_out_channels}, w_bits={self.w_bits}, a_bits={self.a_bits}"
        )


class DynamicQDepthwiseConv2d(_ActiveBits, nn.Module):
    """Quantized depthwise conv with elastic kernel size (and SE), on the first ``C`` channels.

    One ``K x K`` weight (``K`` = largest kernel size); a smaller kernel ``k`` is the centre ``k x k``
    of the next larger transformed kernel, flattened and multiplied by a learned ``k^2 x k^2`` matrix
    (identity at init, shared across channels): 7 -> 5 -> 3. Each kernel size has its own weight and
    activation quantizer banks. The LSQ "full weight" is the transformed kernel of all channels.
    """

    def __init__(
        self,
        max_channels: int,
        ks_list: Sequence[int],
        stride: int = 1,
        *,
        act: str | None,
        se: bool,
        quant_bits: Sequence[int],
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.max_channels = max_channels
        self.ks_list = tuple(sorted(ks_list))
        self.max_kernel_size = self.ks_list[-1]
        self.stride = stride
        self.act_name = act
        self.fused_epilogue = False  # BN + activation (+ the next quantizer) in one op; set by the network
        k = self.max_kernel_size
        self.weight = nn.Parameter(torch.empty(max_channels, 1, k, k))
        self.kernel_transforms = nn.ParameterDict(
            {f"{big}to{small}": nn.Parameter(torch.eye(small * small)) for small, big in self._transform_pairs()}
        )
        self.bn = DynamicBatchNorm2d(max_channels)
        self.act = build_activation(act)
        self.se = DynamicSE(max_channels) if se else None
        self.w_quantizers = nn.ModuleDict({str(ks): weight_bank(quant_bits, backend) for ks in self.ks_list})
        self.a_quantizers = nn.ModuleDict({str(ks): activation_bank(quant_bits, backend) for ks in self.ks_list})
        self.active_kernel_size = self.max_kernel_size
        self._init_bits()

    def _transform_pairs(self) -> list[tuple[int, int]]:
        """``(small, big)`` for every consecutive pair of kernel sizes, largest first."""
        return [(self.ks_list[i - 1], self.ks_list[i]) for i in range(len(self.ks_list) - 1, 0, -1)]

    def set_active_kernel_size(self, ks: int) -> None:
        if ks not in self.ks_list:
            raise ValueError(f"ks={ks} not in {self.ks_list}")
        self.active_kernel_size = ks
        self.set_active_bits(self.w_bits, self.a_bits)  # re-resolve against this kernel size's banks

    def _banks(self) -> tuple[nn.ModuleDict, nn.ModuleDict]:
        ks = str(self.active_kernel_size)
        return self.w_quantizers[ks], self.a_quantizers[ks]

    def kernel(self, ks: int | None = None) -> Tensor:
        """The ``ks x ks`` kernel of every channel, ``(max_channels, 1, ks, ks)`` (default: active size)."""
        ks = self.active_kernel_size if ks is None else ks
        w = self.weight
        for small, big in self._transform_pairs():
            if big <= ks:
                break
            centre = sub_kernel_slice(big, small)
            flat = w[:, :, centre, centre].reshape(self.max_channels, small * small)
            w = F.linear(flat, self.kernel_transforms[f"{big}to{small}"]).view(self.max_channels, 1, small, small)
        return w

    def input_quantizer(self) -> BatchQuantizer | None:
        """The active quantizer of this layer's input (None in full precision)."""
        return None if self._a_key is None else self.a_quantizers[str(self.active_kernel_size)][self._a_key]

    def forward(
        self, x: Tensor, next_quantizer: BatchQuantizer | None = None, *, input_quantized: bool = False
    ) -> Tensor:
        """As :meth:`DynamicQConv2d.forward`. With SE, ``next_quantizer`` quantizes SE's output ``x * gate``
        in one op (:func:`bquant_kernels.gated_batchquant`)."""
        c = x.shape[1]
        if c > self.max_channels:
            raise ValueError(f"input has {c} channels, this depthwise conv holds {self.max_channels}")
        ks = self.active_kernel_size
        if self._a_key is not None and not input_quantized:
            x = self.a_quantizers[str(ks)][self._a_key](x)
        if self._w_quantized is not None:
            w = leading(self._w_quantized, c)
        else:
            w_full = self.kernel(ks)
            w = leading(w_full, c)
            if self._w_key is not None:
                w = self.w_quantizers[str(ks)][self._w_key](w, w_full=w_full)
        y = F.conv2d(x, w, None, self.stride, ks // 2, 1, c)
        if self.se is None:
            return _finish(self, y, next_quantizer)
        y = _finish(self, y, None)
        if next_quantizer is None:
            return self.se(y)
        return _quantize_se(self, y, next_quantizer)

    def weight_for_quantization(self) -> tuple[Tensor, LSQQuantizer, Tensor] | None:
        """``(kernel, quantizer, kernel)``: the active-size kernel of every channel, or None in full precision."""
        wq, _ = self.active_quantizers()
        if wq is None:
            return None
        w_full = self.kernel()
        return w_full, wq, w_full

    @torch.no_grad()
    def to_static(self, channels: int) -> QConv2d:
        """The active layer on ``channels`` channels as a depthwise :class:`QConv2d` (transformed kernel)."""
        ks = self.active_kernel_size
        layer = QConv2d(
            channels,
            channels,
            ks,
            self.stride,
            groups=channels,
            w_bits=self.w_bits,
            a_bits=self.a_bits,
            act=self.act_name,
            se=self.se is not None,
        )
        w_full = self.kernel(ks)
        return _fill_static(layer, self, w_full[:channels], w_full)

    def extra_repr(self) -> str:
        return (
            f"{self.max_channels}, ks_list={self.ks_list}, stride={self.stride}, active_ks={self.active_kernel_size}, "
            f"w_bits={self.w_bits}, a_bits={self.a_bits}"
        )


class DynamicQLinear(_ActiveBits, nn.Module):
    """Quantized fully connected layer (the classifier), with bias, on the first ``C_in`` inputs."""

    def __init__(
        self, in_features: int, out_features: int, *, quant_bits: Sequence[int], backend: str | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.w_quantizer = weight_bank(quant_bits, backend)
        self.a_quantizer = activation_bank(quant_bits, backend)
        self._init_bits()

    def forward(self, x: Tensor) -> Tensor:
        c_in = x.shape[1]
        if c_in > self.in_features:
            raise ValueError(f"input has {c_in} features, this linear layer takes at most {self.in_features}")
        if self._a_key is not None:
            x = self.a_quantizer[self._a_key](x)
        return F.linear(x, self._active_weight(self.out_features, c_in), self.bias)

    def weight_for_quantization(self) -> tuple[Tensor, LSQQuantizer, Tensor] | None:
        """``(weight, quantizer, weight)`` (every input feature), or None in full precision."""
        wq, _ = self.active_quantizers()
        return None if wq is None else (self.weight, wq, self.weight)

    @torch.no_grad()
    def to_static(self, in_features: int) -> QLinear:
        """The active layer (``in_features`` inputs) as a :class:`QLinear` with copied weights and state."""
        layer = QLinear(in_features, self.out_features, w_bits=self.w_bits, a_bits=self.a_bits)
        layer.bias.copy_(self.bias)
        return _fill_static(layer, self, self.weight[:, :in_features], self.weight)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, w_bits={self.w_bits}, a_bits={self.a_bits}"
