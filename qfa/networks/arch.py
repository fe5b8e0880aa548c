"""The QFA MobileNetV3 architecture as data: widths, strides, activations, SE of every layer.

The supernet builder (:mod:`qfa.networks.mobilenetv3`) and the cost model (:mod:`qfa.cost`) both read
this description, so they agree by construction; the tests check both against direct counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..nn.utils import make_divisible
from ..space import SearchSpace

IN_CHANNELS = 3
STEM_STRIDE = 2
STEM_KERNEL = 3
BLOCK0_KERNEL = 3
# Base widths (width multiplier 1.0, spec 1); stages in MBV3_STAGES. Block 0 keeps the stem width.
BASE_STEM_WIDTH = 16
BASE_FINAL_EXPAND_WIDTH = 960
BASE_FEATURE_MIX_WIDTH = 1280


@dataclass(frozen=True)
class StageSpec:
    base_width: int
    stride: int  # of the first block
    act: str
    se: bool


MBV3_STAGES = (
    StageSpec(24, 2, "relu", False),
    StageSpec(40, 2, "relu", True),
    StageSpec(80, 2, "h_swish", False),
    StageSpec(112, 1, "h_swish", True),
    StageSpec(160, 2, "h_swish", True),
)


def mid_channels(in_channels: int, expand: int) -> int:
    """Hidden width of an inverted-residual block: ``make_divisible(round(C_in * e), 8)``."""
    return make_divisible(round(in_channels * expand), 8)


@dataclass(frozen=True)
class BlockSpec:
    """One elastic inverted-residual block (the first block of a stage has the stride and no shortcut)."""

    stage: int
    in_channels: int
    out_channels: int
    stride: int
    act: str
    se: bool
    shortcut: bool

    def mid_channels(self, expand: int) -> int:
        """Hidden width for expand ratio ``expand``."""
        return mid_channels(self.in_channels, expand)


@dataclass(frozen=True)
class MobileNetV3Arch:
    stem_channels: int
    block0_channels: int
    blocks: tuple[BlockSpec, ...]
    final_expand_channels: int
    feature_mix_channels: int
    n_classes: int

    @classmethod
    def from_space(cls, space: SearchSpace, n_classes: int) -> MobileNetV3Arch:
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
            raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")

        def width(base: int) -> int:
            return make_divisible(base * space.width_mult, 8)

        stem = width(BASE_STEM_WIDTH)
        blocks = []
        c_in = stem
        for s, stage in enumerate(MBV3_STAGES):
            c_out = width(stage.base_width)
            for i in range(space.max_depth):
                first = i == 0
                blocks.append(
                    BlockSpec(
                        stage=s,
                        in_channels=c_in,
                        out_channels=c_out,
                        stride=stage.stride if first else 1,
                        act=stage.act,
                        se=stage.se,
                        shortcut=not first,
                    )
                )
                c_in = c_out
        return cls(
            stem_channels=stem,
            block0_channels=stem,
            blocks=tuple(blocks),
            final_expand_channels=width(BASE_FINAL_EXPAND_WIDTH),
            feature_mix_channels=width(BASE_FEATURE_MIX_WIDTH),
            n_classes=n_classes,
        )

    @property
    def last_block_channels(self) -> int:
        return self.blocks[-1].out_channels
