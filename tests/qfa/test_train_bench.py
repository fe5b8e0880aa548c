"""bench/train_step.py runs, times every variant on the same subnets, and really routes the eager
variant through the published eager quantizers."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_step_benchmark(tmp_path, monkeypatch):
    import bench.eager_published as eager
    from bench import train_step

    calls = {"batchquant": 0, "lsq": 0}
    for key in ("batchquant", "lsq"):
        original = getattr(eager, f"{key}_published")

        def counted(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(eager, f"{key}_published", counted)
    import bquant_kernels.modules as modules

    monkeypatch.setattr(modules, "batchquant", modules.batchquant)  # undone after the test
    monkeypatch.setattr(modules, "lsq", modules.lsq)
    out = tmp_path / "ts.json"
    argv = ["--device", "cpu", "--batch-size", "8", "--resolutions", "16:24:8", "--width-mult", "0.25",
            "--subnets", "2", "--steps", "1", "--variants", "fp", "reference", "eager", "--no-isolate",
            "--json", str(out)]  # fmt: skip
    assert train_step.main(argv) == 0
    record = json.loads(out.read_text())
    results = {r["variant"]: r for r in record["results"]}
    assert list(results) == ["fp", "reference", "eager"]  # eager last: its patch is process-wide
    assert results["fp"]["bits"] == [32] and results["eager"]["bits"] == [2, 3, 4]
    assert all(r["ms_mean"] > 0 and r["peak_mem_mb"] > 0 for r in results.values())
    assert results["eager"]["speedup_vs_eager"] == pytest.approx(1.0)
    assert results["reference"]["cost_vs_fp"] == pytest.approx(
        results["reference"]["ms_mean"] / results["fp"]["ms_mean"]
    )
    # the eager variant ran the published functions: 2 passes x 2 subnets, dozens of layers each
    assert calls["batchquant"] > 50 and calls["lsq"] > 50
