"""Layout of the small per-call ``qparams`` tensor (mirror of ``csrc/common/quant_math.h``).

Every BatchQuant forward returns it and its backward consumes it, so the batch statistics and the
observer are computed once, on the device, with no host sync.
"""

LO, HI, SCALE, ZERO, L, DL_DTHETA = range(6)
NUM_QPARAMS = 6

LN2 = 0.69314718055994530942
SOFTPLUS_THRESHOLD = 20.0
MIN_SCALE = 2.0**-23


def batchquant_grid(bits: int, signed: bool) -> tuple[float, float]:
    """Integer grid ``(qmin, qmax)`` of a BatchQuant quantizer (spec 1)."""
    if signed:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def lsq_grid(bits: int, signed: bool) -> tuple[float, float]:
    """LSQ grid ``(Qn, Qp)`` (spec 2); ``Qp = 1`` for signed 1-bit."""
    if not signed:
        return 0.0, float(2**bits - 1)
    if bits == 1:
        return -1.0, 1.0
    return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
