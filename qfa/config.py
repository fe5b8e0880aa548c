"""``SubnetConfig``: one subnet of the QFA supernet, as plain JSON-serialisable lists."""

from __future__ import annotations

import json
import operator
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

_LIST_FIELDS = ("ks", "e", "d", "w_bits", "a_bits")


def as_int(field: str, value: object) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{field} must be an int, got {value!r}")
    try:
        return operator.index(value)  # accepts numpy integers, rejects floats and strings
    except TypeError:
        raise TypeError(f"{field} must be an int, got {value!r} ({type(value).__name__})") from None


def int_list(field: str, values: object) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        if hasattr(values, "tolist"):  # numpy arrays and tensors
            values = values.tolist()
        else:
            raise TypeError(f"{field} must be a list of ints, got {type(values).__name__}")
    return [as_int(f"{field}[{i}]", v) for i, v in enumerate(values)]


class ConfigChecker(Protocol):
    """What :meth:`SubnetConfig.validate` needs of a search space (:class:`qfa.SearchSpace` is one); a
    protocol, so this module imports nothing of the space that builds configs."""

    def check_config(self, cfg: SubnetConfig) -> None: ...


@dataclass
class SubnetConfig:
    """A subnet: kernel size and expand ratio per elastic block, depth per stage, bit-widths per layer.

    ``w_bits`` / ``a_bits`` have one entry per quantized conv/linear layer in module order (block 0
    depthwise and pointwise, then expand / depthwise / project of every elastic block, then final
    expand, feature mix and classifier); inactive blocks keep their entries. 32 means "not quantized".
    ``resolution`` is the input size the subnet is meant for (``None``: not chosen); the model does
    not apply it, the data pipeline / :func:`qfa.evaluate_subnet` do.
    """

    ks: list[int]
    e: list[int]
    d: list[int]
    w_bits: list[int]
    a_bits: list[int]
    resolution: int | None = None

    def __post_init__(self) -> None:
        for name in _LIST_FIELDS:
            setattr(self, name, int_list(name, getattr(self, name)))
        if self.resolution is not None:
            self.resolution = as_int("resolution", self.resolution)

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SubnetConfig:
        if not isinstance(data, Mapping):
            raise TypeError(f"a SubnetConfig dict must be a mapping, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        missing = [n for n in _LIST_FIELDS if n not in data]
        if unknown or missing:
            raise ValueError(f"bad SubnetConfig dict: unknown keys {unknown}, missing keys {missing}")
        return cls(**{n: data[n] for n in names if n in data})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SubnetConfig:
        return cls.from_dict(json.loads(text))

    # ------------------------------------------------------------------ validation

    def validate(self, space: ConfigChecker) -> SubnetConfig:
        """Raise ``ValueError`` naming the first bad field (e.g. ``"ks[3]=4 not in (3, 5, 7)"``); return ``self``."""
        space.check_config(self)
        return self
