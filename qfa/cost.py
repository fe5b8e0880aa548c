"""Cost model of QFA subnets: MACs, parameters, BitOPs and LUT-FLOPs (spec 6), vectorised with numpy.

Definitions (per conv / linear layer of the active subnet, from layer shapes):

- ``macs``: multiply-accumulates of every conv and linear layer, SE included
  (``C_out * C_in / groups * k^2 * H_out * W_out``); BN, activations, pooling and adds are not counted.
- ``params``: conv / linear weights and biases plus BN affine parameters of the active subnet
  (what :meth:`QFAMobileNetV3.get_active_subnet` holds, quantizer parameters excluded).
- ``bitops``: ``sum(macs * min(b_w, 8) * min(b_a, 8))``; 32 bits counts as 8 and the layers that stay
  in full precision (stem, SE) count as 8 x 8.
- ``lut_flops``: ``bitops / 64`` (spec 6's definition of the paper's "MFLOPs" of quantized subnets).
- ``published_lut_flops``: the number the published search actually used: its FLOPs look-up table of
  another network (``round(C * 1.2)`` widths, FLOPs with +2 per output, SE at the depthwise bits, ...)
  combined by its rule (:mod:`qfa.flops_lut`, docs/metrics.md). From the closed formula of that table
  (any resolution >= 32, any width multiplier), or from a user's table (``flops_lut``).

``CostModel.evaluate_batch`` scores many configs at once from per-block tables (10^5 configs in a
fraction of a second); the single-config methods go through it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from .config import SubnetConfig
from .flops_lut import MIN_RESOLUTION, FlopsLUT, normalise_table, read_table
from .networks.arch import BLOCK0_KERNEL, IN_CHANNELS, STEM_KERNEL, STEM_STRIDE, MobileNetV3Arch
from .nn.se import se_mid_channels
from .space import SearchSpace

DEFAULT_RESOLUTION = 224
FP_BITS = 8  # bit-width at which full-precision layers and 32-bit choices are counted
METRICS = ("macs", "params", "bitops", "lut_flops", "published_lut_flops")
METRIC_LABELS = {
    "macs": "MACs",
    "params": "parameters",
    "bitops": "BitOPs",
    "lut_flops": "LUT-FLOPs (BitOPs / 64)",
    "published_lut_flops": "LUT-FLOPs (published table)",
}


def _conv_out(size: np.ndarray, stride: int) -> np.ndarray:
    """Output size of a conv with odd kernel k, padding k // 2 and ``stride`` (independent of k)."""
    return (size - 1) // stride + 1


class CostModel:
    """Costs of subnets of a supernet (given as a :class:`QFAMobileNetV3` or a :class:`SearchSpace`).

    Args:
        space_or_model: the supernet, or its search space (then ``n_classes`` is needed).
        n_classes: classifier outputs when a space is given (ignored for a model).
        flops_lut: a FLOPs table in the published layout (a path to its JSON or ``.npy`` form, or the
            loaded mapping) to compute ``published_lut_flops`` with, instead of the closed formula;
            checked against the space (resolutions, blocks, ``(k, e)`` entries).
        allow_pickle: allow reading a ``.npy`` table (a pickle: loading it runs code from the file).

    ``metrics`` lists what :meth:`evaluate_batch` returns: ``published_lut_flops`` is left out where the
    closed formula is not defined (not the MobileNetV3 template, resolutions below 32);
    :meth:`published_lut_flops` then raises a ``ValueError`` saying why.
    """

    def __init__(
        self,
        space_or_model: object,
        n_classes: int = 1000,
        flops_lut: str | os.PathLike | Mapping | None = None,
        allow_pickle: bool = False,
    ) -> None:
        if isinstance(space_or_model, SearchSpace):
            self.space = space_or_model
            self.arch = MobileNetV3Arch.from_space(self.space, n_classes)
        elif isinstance(getattr(space_or_model, "space", None), SearchSpace) and hasattr(space_or_model, "arch"):
            self.space, self.arch = space_or_model.space, space_or_model.arch
        else:
            raise TypeError(f"space_or_model must be a SearchSpace or a QFAMobileNetV3, got {type(space_or_model)}")
        self._build_tables()
        self.published, self.published_error = self._published_lut(flops_lut, allow_pickle)
        self.metrics = METRICS if self.published is not None else METRICS[:-1]

    def _published_lut(self, flops_lut: object, allow_pickle: bool) -> tuple[FlopsLUT | None, str | None]:
        """The published-rule scorer, or ``(None, why not)`` where the closed formula is not defined."""
        space = self.space
        if flops_lut is not None:
            if isinstance(flops_lut, Mapping):
                table = normalise_table(flops_lut, "flops_lut")
                source = "flops_lut"
            else:
                table, source = read_table(flops_lut, allow_pickle=allow_pickle), f"--flops-lut {flops_lut}"
            return FlopsLUT(space, self.arch.n_classes, table, source), None
        if self.arch != MobileNetV3Arch.from_space(space, self.arch.n_classes):
            return None, "published_lut_flops is defined only for the MobileNetV3 template of the search space"
        if min(space.resolutions) < MIN_RESOLUTION:
            return None, (
                f"published_lut_flops needs resolutions >= {MIN_RESOLUTION} (the published table's last "
                f"feature map r // {MIN_RESOLUTION} is empty below); this supernet has {min(space.resolutions)}"
            )
        return FlopsLUT(space, self.arch.n_classes), None

    # ------------------------------------------------------------------ tables

    def _build_tables(self) -> None:
        space, arch = self.space, self.arch
        ex = np.asarray(space.expand_list)
        blocks = arch.blocks
        self._c_in = np.array([b.in_channels for b in blocks], dtype=np.float64)
        self._c_out = np.array([b.out_channels for b in blocks], dtype=np.float64)
        self._stride = np.array([b.stride for b in blocks])
        mid = np.array([[b.mid_channels(int(e)) for e in ex] for b in blocks], dtype=np.float64)  # (B, E)
        se_mid = np.array(
            [[se_mid_channels(int(m)) if b.se else 0 for m in row] for b, row in zip(blocks, mid, strict=True)]
        )
        self._mid = mid
        self._se_macs = 2.0 * mid * se_mid  # reduce + expand on the pooled 1x1 map
        self._se_params = np.where(se_mid > 0, 2.0 * mid * se_mid + se_mid + mid, 0.0)  # weights + biases
        self._block_qlayer = np.asarray(space.block_first_qlayer)  # each block's expand layer in w_bits / a_bits
        c0, stem = arch.block0_channels, arch.stem_channels
        final, mix, n = arch.final_expand_channels, arch.feature_mix_channels, arch.n_classes
        c_last = arch.last_block_channels
        # Per-image MACs of the fixed layers, to be scaled by their spatial size.
        self._stem_macs = float(IN_CHANNELS * STEM_KERNEL**2 * stem)
        self._block0_dw_macs = float(BLOCK0_KERNEL**2 * c0)
        self._block0_pw_macs = float(c0 * c0)
        self._final_macs = float(c_last * final)
        self._mix_macs = float(final * mix)  # on the pooled 1x1 map
        self._cls_macs = float(mix * n)
        fixed_params = {
            "stem": IN_CHANNELS * STEM_KERNEL**2 * stem + 2 * stem,  # conv + BN
            "block0": BLOCK0_KERNEL**2 * c0 + 2 * c0 + c0 * c0 + 2 * c0,  # depthwise + BN, pointwise + BN
            "final_expand": c_last * final + 2 * final,  # conv + BN
            "feature_mix": final * mix,  # no BN, no bias
            "classifier": mix * n + n,
        }
        self._fixed_params = float(sum(fixed_params.values()))

    # ------------------------------------------------------------------ inputs

    def to_arrays(self, configs: Sequence[SubnetConfig]) -> dict[str, np.ndarray]:
        """Stack configs into ``{"ks", "e", "d", "w_bits", "a_bits", "resolution"}`` int arrays."""
        out = {
            name: np.array([getattr(c, name) for c in configs], dtype=np.int64)
            for name in ("ks", "e", "d", "w_bits", "a_bits")
        }
        out["resolution"] = np.array(
            [DEFAULT_RESOLUTION if c.resolution is None else c.resolution for c in configs], dtype=np.int64
        )
        return out

    def _check_arrays(self, arrays: Mapping[str, object]) -> dict[str, np.ndarray]:
        s = self.space
        widths = {"ks": s.n_blocks, "e": s.n_blocks, "d": s.n_stages, "w_bits": s.n_qlayers, "a_bits": s.n_qlayers}
        out = {}
        n = None
        for name, width in widths.items():
            if name not in arrays:
                raise ValueError(f"arrays is missing {name!r} (needs {sorted(widths)} and optionally 'resolution')")
            a = np.asarray(arrays[name])
            if a.ndim != 2 or a.shape[1] != width:
                raise ValueError(f"{name} must have shape (N, {width}), got {a.shape}")
            n = a.shape[0] if n is None else n
            if a.shape[0] != n:
                raise ValueError(f"{name} has {a.shape[0]} rows, expected {n}")
            out[name] = a.astype(np.int64)
        for name, allowed in (("ks", s.ks_list), ("e", s.expand_list), ("d", s.depth_list)):
            bad = ~np.isin(out[name], allowed)
            if bad.any():
                i, j = np.argwhere(bad)[0]
                raise ValueError(f"{name}[{i}, {j}]={out[name][i, j]} not in {allowed}")
        for name in ("w_bits", "a_bits"):
            bad = ~(((out[name] >= 2) & (out[name] <= 8)) | (out[name] == 32))
            if bad.any():
                i, j = np.argwhere(bad)[0]
                raise ValueError(f"{name}[{i}, {j}]={out[name][i, j]} not in 2..8 or 32")
        res = np.asarray(arrays.get("resolution", DEFAULT_RESOLUTION), dtype=np.int64)
        res = np.broadcast_to(res, (n,)) if res.ndim == 0 else res
        if res.shape != (n,) or (res < 1).any():
            raise ValueError(f"resolution must be a positive int or an (N,) array of them, got shape {res.shape}")
        out["resolution"] = res
        return out

    # ------------------------------------------------------------------ evaluation

    def evaluate_batch(self, arrays: Mapping[str, object] | Sequence[SubnetConfig]) -> dict[str, np.ndarray]:
        """Costs of N configs: ``arrays`` maps ``ks``/``e`` (N, n_blocks), ``d`` (N, n_stages),
        ``w_bits``/``a_bits`` (N, n_qlayers) and optional ``resolution`` (N,) or scalar (default 224);
        a sequence of :class:`SubnetConfig` is also accepted. Returns float64 arrays (N,) of each of
        :attr:`metrics` (``macs``, ``params``, ``bitops``, ``lut_flops``, ``published_lut_flops``)."""
        if not isinstance(arrays, Mapping):
            arrays = self.to_arrays(list(arrays))
        a = self._check_arrays(arrays)
        ks, d, res = a["ks"].astype(np.float64), a["d"], a["resolution"]
        wq = np.minimum(a["w_bits"], FP_BITS).astype(np.float64)
        aq = np.minimum(a["a_bits"], FP_BITS).astype(np.float64)
        bits = wq * aq  # (N, Q)
        n_blocks = self.space.n_blocks
        blocks = np.arange(n_blocks)

        e_idx = np.searchsorted(self.space.expand_list, a["e"])  # (N, B)
        mid = self._mid[blocks, e_idx]
        active = self.space.active_block_mask(d)  # (N, B)

        # Spatial sizes: after the stem, then per block (input, output).
        h = _conv_out(res, STEM_STRIDE)
        stem_hw = (h * h).astype(np.float64)
        h_in = np.empty((len(res), n_blocks), dtype=np.int64)
        for b in range(n_blocks):
            h_in[:, b] = h
            h = _conv_out(h, int(self._stride[b]))
        h_out = _conv_out(h_in, self._stride[None, :])
        last_hw = (h * h).astype(np.float64)  # the last stage always runs >= 1 block
        hw_in, hw_out = (h_in * h_in).astype(np.float64), (h_out * h_out).astype(np.float64)

        expand = self._c_in * mid * hw_in
        depthwise = ks * ks * mid * hw_out
        project = mid * self._c_out * hw_out
        se = self._se_macs[blocks, e_idx]
        q0 = self._block_qlayer
        block_macs = (expand + depthwise + project + se) * active
        block_bitops = (
            expand * bits[:, q0] + depthwise * bits[:, q0 + 1] + project * bits[:, q0 + 2] + se * FP_BITS**2
        ) * active

        fixed = [  # (macs per sample, bit product)
            (self._stem_macs * stem_hw, FP_BITS**2),
            (self._block0_dw_macs * stem_hw, bits[:, 0]),
            (self._block0_pw_macs * stem_hw, bits[:, 1]),
            (self._final_macs * last_hw, bits[:, -3]),
            (np.full(len(res), self._mix_macs), bits[:, -2]),
            (np.full(len(res), self._cls_macs), bits[:, -1]),
        ]
        macs = block_macs.sum(axis=1) + sum(m for m, _ in fixed)
        bitops = block_bitops.sum(axis=1) + sum(m * b for m, b in fixed)

        params_block = (
            self._c_in * mid
            + 2 * mid  # expand + BN
            + ks * ks * mid
            + 2 * mid  # depthwise + BN
            + self._se_params[blocks, e_idx]
            + mid * self._c_out
            + 2 * self._c_out  # project + BN
        )
        params = (params_block * active).sum(axis=1) + self._fixed_params
        out = {"macs": macs, "params": params, "bitops": bitops, "lut_flops": bitops / FP_BITS**2}
        if self.published is not None:
            out["published_lut_flops"] = self.published.score(a["ks"], a["e"], active, a["w_bits"], a["a_bits"], res)
        return out

    def _one(self, cfg: SubnetConfig, metric: str) -> float:
        if not isinstance(cfg, SubnetConfig):
            raise TypeError(f"cfg must be a SubnetConfig, got {type(cfg).__name__}")
        if metric not in self.metrics:
            raise ValueError(self.published_error)
        return float(self.evaluate_batch([cfg])[metric][0])

    def macs(self, cfg: SubnetConfig) -> float:
        """MACs of ``cfg`` at ``cfg.resolution`` (default 224)."""
        return self._one(cfg, "macs")

    def params(self, cfg: SubnetConfig) -> float:
        """Parameters of ``cfg`` (quantizer parameters excluded)."""
        return self._one(cfg, "params")

    def bitops(self, cfg: SubnetConfig) -> float:
        """BitOPs of ``cfg``: MACs weighted by ``min(b_w, 8) * min(b_a, 8)`` (FP layers at 8 x 8)."""
        return self._one(cfg, "bitops")

    def lut_flops(self, cfg: SubnetConfig) -> float:
        """LUT-FLOPs of ``cfg``: BitOPs / 64 (spec 6)."""
        return self._one(cfg, "lut_flops")

    def published_lut_flops(self, cfg: SubnetConfig) -> float:
        """LUT-FLOPs of ``cfg`` as the published search scored it (its table and rule; docs/metrics.md)."""
        return self._one(cfg, "published_lut_flops")
