"""``QFAMobileNetV3``: the Quantized-for-all MobileNetV3 supernet (docs/spec-qfa-supernet.md)."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bquant_kernels import BatchQuantizer, LSQQuantizer

from ..config import SubnetConfig
from ..nn import (
    BackendOwner,
    DynamicBatchNorm2d,
    DynamicQConv2d,
    DynamicQDepthwiseConv2d,
    DynamicQLinear,
    bank_bits,
    quantized_weights,
)
from ..space import DEFAULT_RESOLUTIONS, SearchSpace
from .arch import BLOCK0_KERNEL, IN_CHANNELS, STEM_KERNEL, STEM_STRIDE, MobileNetV3Arch
from .blocks import DynamicMBConv, ResidualBlock
from .subnet import MobileNetV3Subnet, check_input


class QFAMobileNetV3(BackendOwner):
    """The QFA MobileNetV3 supernet: elastic kernel size, expand ratio, depth and bit-widths.

    Args:
        n_classes: classifier outputs.
        width_mult: width multiplier of the base MobileNetV3 widths (fixed, not elastic).
        ks_list, expand_list, depth_list: elastic options (spec 2).
        bits_list: bit-width options of the quantized layers; may include 32 (phase 0 of training).
            Every layer holds one quantizer per bit-width of ``bits_list`` (except 32) plus 8.
        dropout: dropout before the classifier.
        backend: bquant_kernels backend for every quantizer op (``None``: the fastest available); the
            ``backend`` attribute, settable at any time, is the one place it is held
            (:class:`qfa.nn.BackendOwner`); :meth:`get_active_subnet` builds with it.
        resolutions: input sizes of the search space (default 128..224 step 4); the model itself
            takes any size (32 px gives a 1x1 final feature map).

    The active subnet is set with :meth:`set_active_subnet` / :meth:`set_active_config` /
    :meth:`sample_active_subnet` / :meth:`set_sandwich_subnet` / :meth:`set_full_precision`; it
    starts as the full-precision max subnet. ``forward`` runs the active subnet only.
    """

    def __init__(
        self,
        n_classes: int = 1000,
        width_mult: float = 1.2,
        ks_list: Sequence[int] = (3, 5, 7),
        expand_list: Sequence[int] = (3, 4, 6),
        depth_list: Sequence[int] = (2, 3, 4),
        bits_list: Sequence[int] = (2, 3, 4),
        dropout: float = 0.1,
        backend: str | None = None,
        resolutions: Sequence[int] = DEFAULT_RESOLUTIONS,
    ) -> None:
        super().__init__()
        self.space = SearchSpace(
            ks_list=ks_list,
            expand_list=expand_list,
            depth_list=depth_list,
            bits_list=bits_list,
            resolutions=resolutions,
            width_mult=width_mult,
        )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.arch = MobileNetV3Arch.from_space(self.space, n_classes)
        self.n_classes = n_classes
        space, arch = self.space, self.arch
        common = {"quant_bits": bank_bits(space.bits_list)}

        self.first_conv = DynamicQConv2d(
            IN_CHANNELS, arch.stem_channels, STEM_KERNEL, STEM_STRIDE, bn=True, act="h_swish", **common
        )
        block0 = DynamicMBConv(
            arch.stem_channels,
            arch.block0_channels,
            ks_list=(BLOCK0_KERNEL,),
            expand_list=(1,),
            stride=1,
            act="relu",
            se=False,
            **common,
        )
        blocks = [ResidualBlock(block0, shortcut=arch.stem_channels == arch.block0_channels)]
        for spec in arch.blocks:
            conv = DynamicMBConv(
                spec.in_channels,
                spec.out_channels,
                ks_list=space.ks_list,
                expand_list=space.expand_list,
                stride=spec.stride,
                act=spec.act,
                se=spec.se,
                **common,
            )
            blocks.append(ResidualBlock(conv, shortcut=spec.shortcut))
        self.blocks = nn.ModuleList(blocks)
        self.final_expand_layer = DynamicQConv2d(
            arch.last_block_channels, arch.final_expand_channels, 1, bn=True, act="h_swish", **common
        )
        self.feature_mix_layer = DynamicQConv2d(
            arch.final_expand_channels, arch.feature_mix_channels, 1, bn=False, act="h_swish", **common
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = DynamicQLinear(arch.feature_mix_channels, n_classes, **common)

        self.backend = backend  # every quantizer built above
        # Quantized layers in SubnetConfig order, named by the space (plain tuple: not registered twice).
        self._qlayers = tuple(self.get_submodule(name) for name in space.qlayer_names)
        self._active_blocks: tuple[nn.Module, ...] = ()
        self._active_qlayers: tuple[nn.Module, ...] = ()
        # Weights of the active layers quantized in one multi-tensor op per forward (False: one op per
        # layer, as a layer used on its own does; same numbers).
        self.group_weight_quantization = True
        self.fused_epilogue = True
        self._config: SubnetConfig | None = None
        self._init_weights()
        self.set_full_precision()

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def _init_weights(self) -> None:
        """He (fan-out) normal for convs, uniform(+-1/sqrt(fan_in)) for the classifier, BN 1/0 (as OFA)."""
        for m in self.modules():
            if isinstance(m, (DynamicQConv2d, DynamicQDepthwiseConv2d)):
                out_c, _, kh, kw = m.weight.shape
                m.weight.normal_(0.0, math.sqrt(2.0 / (kh * kw * out_c)))
            elif isinstance(m, nn.Conv2d):  # SE
                out_c, _, kh, kw = m.weight.shape
                m.weight.normal_(0.0, math.sqrt(2.0 / (kh * kw * out_c)))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, DynamicQLinear):
                bound = 1.0 / math.sqrt(m.in_features)
                m.weight.uniform_(-bound, bound)
                m.bias.zero_()
            elif isinstance(m, DynamicBatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()

    @property
    def fused_epilogue(self) -> bool:
        """Whether each layer's BN, activation and (where the next layer's input is exactly that
        activation) the next BatchQuant run as one fused op (:func:`bquant_kernels.epilogue.bn_act_quant`)
        instead of separate modules; the same numbers within the spec's tolerance, fewer ops and passes."""
        return self._fused_epilogue

    @fused_epilogue.setter
    def fused_epilogue(self, value: bool) -> None:
        for m in self.modules():
            if isinstance(m, (DynamicQConv2d, DynamicQDepthwiseConv2d)):
                m.fused_epilogue = bool(value)
        self._fused_epilogue = bool(value)

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> Tensor:
        check_input(x)
        with quantized_weights(self._active_qlayers if self.group_weight_quantization else ()):
            if self._fused_epilogue:
                x = self._chained_features(x)
            else:
                x = self.first_conv(x)
                x = self.blocks[0](x)
                for block in self._active_blocks:
                    x = block(x)
                x = self.final_expand_layer(x)
            x = self.feature_mix_layer(x.mean((2, 3), keepdim=True))
            return self.classifier(self.dropout(torch.flatten(x, 1)))

    def _chained_features(self, x: Tensor) -> Tensor:
        """Stem, blocks and final expand layer with each layer's output quantized for the next layer in
        its fused epilogue, across blocks too: a block's shortcut add and the next block's input
        quantizer run in its project conv's epilogue, which also hands on the unquantized output where
        the next block's shortcut needs it."""
        blocks = (self.blocks[0], *self._active_blocks)
        quantizers = [b.conv.input_quantizer() for b in blocks] + [self.final_expand_layer.input_quantizer()]
        keeps = [b.shortcut for b in blocks] + [False]
        out = self.first_conv(x, quantizers[0], keep_activation=keeps[0])
        for i, block in enumerate(blocks):
            x, x_in = out if keeps[i] else (None, out)
            out = block(x, x_in, input_quantized=quantizers[i] is not None, next_quantizer=quantizers[i + 1],
                        keep_activation=keeps[i + 1])  # fmt: skip
        return self.final_expand_layer(out, input_quantized=quantizers[-1] is not None)

    # ------------------------------------------------------------------ subnet control

    def set_active_config(self, cfg: SubnetConfig) -> None:
        """Activate ``cfg`` (validated first; on error nothing changes). ``cfg.resolution`` is not applied."""
        self.space.check_config(cfg)
        for block, ks, e in zip(self.blocks[1:], cfg.ks, cfg.e, strict=True):
            block.conv.set_active(ks, e)
        for layer, w, a in zip(self._qlayers, cfg.w_bits, cfg.a_bits, strict=True):
            layer.set_active_bits(w, a)
        active = self.space.active_blocks(cfg.d)
        self._active_blocks = tuple(self.blocks[1 + b] for b in active)
        on = set(active)
        self._active_qlayers = tuple(
            layer for layer, b in zip(self._qlayers, self.space.qlayer_block, strict=True) if b < 0 or b in on
        )
        self._config = SubnetConfig(
            list(cfg.ks), list(cfg.e), list(cfg.d), list(cfg.w_bits), list(cfg.a_bits), resolution=None
        )

    def set_active_subnet(
        self,
        ks: int | Sequence[int] | None = None,
        e: int | Sequence[int] | None = None,
        d: int | Sequence[int] | None = None,
        w_bits: int | Sequence[int] | None = None,
        a_bits: int | Sequence[int] | None = None,
    ) -> None:
        """Each argument: ``None`` (keep), an int (every block / stage / layer) or a full list.

        The classifier's bits are raised to 8 unless 32 (spec 3). Invalid values raise ``ValueError``
        naming the field (e.g. ``"ks[3]=4 not in (3, 5, 7)"``).
        """
        self.set_active_config(self.space.make_config(ks, e, d, w_bits, a_bits, base=self._config))

    def sample_active_subnet(self, rng: random.Random) -> SubnetConfig:
        """Activate and return a uniformly sampled subnet (:meth:`SearchSpace.sample`); ``rng`` seeded
        identically on every rank gives every rank the same subnet."""
        cfg = self.space.sample(rng)
        self.set_active_config(cfg)
        return cfg

    def set_sandwich_subnet(self, kind: str, rng: random.Random) -> SubnetConfig:
        """Activate and return the ``"min"`` or ``"max"`` sandwich subnet (:meth:`SearchSpace.sandwich`)."""
        cfg = self.space.sandwich(kind, rng)
        self.set_active_config(cfg)
        return cfg

    def set_full_precision(self) -> SubnetConfig:
        """Activate the max subnet with every bit-width 32 (the full-precision teacher)."""
        cfg = self.space.full_precision()
        self.set_active_config(cfg)
        return cfg

    def get_active_config(self) -> SubnetConfig:
        """A copy of the active config (``resolution`` None)."""
        return copy.deepcopy(self._config)

    @torch.no_grad()
    def get_active_subnet(self) -> MobileNetV3Subnet:
        """A standalone static quantized network of the active subnet.

        Weights (sliced, kernel-transformed), BN parameters and running statistics, SE weights and
        quantizer parameters (LSQ steps, BatchQuant theta/offset/running range) are copied, so its
        eval output equals the supernet's. LSQ steps are never re-initialised. On the supernet's
        device; train/eval mode follows the supernet.
        """
        device = self.first_conv.weight.device
        with torch.device(device):
            first_conv = self.first_conv.to_static(IN_CHANNELS)
            blocks = [ResidualBlock(b.conv.to_static(), b.shortcut) for b in (self.blocks[0], *self._active_blocks)]
            c_last = self._active_blocks[-1].conv.out_channels if self._active_blocks else self.arch.block0_channels
            final_expand = self.final_expand_layer.to_static(c_last)
            feature_mix = self.feature_mix_layer.to_static(self.arch.final_expand_channels)
            classifier = self.classifier.to_static(self.arch.feature_mix_channels)
        net = MobileNetV3Subnet(
            first_conv,
            blocks,
            final_expand,
            feature_mix,
            self.dropout.p,
            classifier,
            config=self.get_active_config(),
        )
        net.backend = self.backend
        return net.to(device=device, dtype=self.first_conv.weight.dtype).train(self.training)

    # ------------------------------------------------------------------ parameters

    def quantizers(self) -> list[str]:
        """Names of the (weight, activation) quantizer groups in the published order (212 for the
        published net): stem; block 0; per block expand, depthwise (w per ks, a per ks), project; head.
        Each names an ``nn.ModuleDict`` of one quantizer per bit-width."""
        names: list[str] = []
        for name, m in self.named_modules():
            if isinstance(m, (DynamicQConv2d, DynamicQLinear)):
                names += [f"{name}.w_quantizer", f"{name}.a_quantizer"]
            elif isinstance(m, DynamicQDepthwiseConv2d):
                names += [f"{name}.w_quantizers.{ks}" for ks in m.ks_list]
                names += [f"{name}.a_quantizers.{ks}" for ks in m.ks_list]
        return names

    def no_decay_parameters(self) -> list[nn.Parameter]:
        """Parameters without weight decay: BN weights and biases, all biases, quantizer parameters."""
        out: dict[int, nn.Parameter] = {}
        for m in self.modules():
            if isinstance(m, (DynamicBatchNorm2d, BatchQuantizer, LSQQuantizer)):
                out.update((id(p), p) for p in m.parameters(recurse=False))
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                out[id(p)] = p
        return list(out.values())

    @property
    def config_kwargs(self) -> dict:
        """Constructor arguments that rebuild this architecture (saved in checkpoints)."""
        s = self.space
        return {
            "n_classes": self.n_classes,
            "width_mult": s.width_mult,
            "ks_list": list(s.ks_list),
            "expand_list": list(s.expand_list),
            "depth_list": list(s.depth_list),
            "bits_list": list(s.bits_list),
            "dropout": self.dropout.p,
            "resolutions": list(s.resolutions),
        }

    def extra_repr(self) -> str:
        return f"n_classes={self.n_classes}, space={self.space}"
