"""Every ```python block of README.md runs as written (each in a fresh namespace, in order)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_readme_has_python_snippets():
    assert len(BLOCKS) >= 2  # the kernel and the qfa snippets; a README without them lost its examples


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index):
    code = compile(BLOCKS[index], f"README.md python block {index + 1}", "exec")
    exec(code, {"__name__": f"readme_snippet_{index + 1}"})
