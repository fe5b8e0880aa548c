"""Bad input to the ``qfa`` command: one-line errors from the console entry, checks that run before the
work starts (and before an output can be overwritten), and the files the writers leave behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qfa
from qfa import io as qfa_io
from qfa.checkpoint import load_supernet
from qfa.cli import entry, main
from qfa.search.predictor import load_predictor
from qfa.search.runtime import resolve_device
from qfa.train.ckpt import CheckpointError
from qfa.train.distributed import parse_device, pick_device
from qfa.train.evaluation import with_resolution
from qfa.train.options import EvalOptions, load_config_file
from qfa.train.report import JsonlLog
from qfa.train.weights import read_checkpoint

ROOT = Path(__file__).resolve().parents[2]
RESOLUTIONS = (8, 12, 16)


def _entry(capsys, argv: list[str]) -> tuple[int, str]:
    rc = entry(argv)
    err = capsys.readouterr().err
    return rc, err


# ----------------------------------------------------------------------------- item 1: the console entry


def test_entry_reports_user_errors_in_one_line_and_main_still_raises(files, capsys, tmp_path):
    argv = ["collect", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "c.jsonl")]
    argv += ["--num-samples", "1", "--device", "cpu"]
    rc, err = _entry(capsys, argv)
    assert rc == 1
    assert err == f"qfa collect: error: --checkpoint: file not found: {tmp_path / 'missing.pt'}\n"
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        main(argv)


def test_entry_does_not_swallow_bugs(monkeypatch, tmp_path):
    from qfa.commands import collect

    def buggy(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(collect, "run", buggy)
    with pytest.raises(RuntimeError, match="a bug"):
        entry(["collect", "--checkpoint", "x", "--out", str(tmp_path / "c.jsonl"), "--num-samples", "1"])


@pytest.mark.parametrize("name", ["garbage", "trunc"])
def test_corrupt_checkpoint_or_predictor_names_the_file(files, name, capsys, tmp_path):
    path = files[name]
    for load in (load_supernet, load_predictor):
        with pytest.raises(ValueError, match="is corrupt or not a torch checkpoint") as info:
            load(path)
        assert str(path) in str(info.value) and "weights_only" not in str(info.value)
    with pytest.raises(CheckpointError, match="is corrupt or not a torch checkpoint") as info:
        read_checkpoint(path)  # eval's and calibrate's loader
    assert "weights_only" not in str(info.value)
    rc, err = _entry(
        capsys, ["collect", "--checkpoint", str(path), "--out", str(tmp_path / "c.jsonl"), "--num-samples", "1"]
    )
    assert rc == 1 and err.startswith("qfa collect: error: ") and "corrupt" in err and err.count("\n") == 1
    with pytest.raises(FileNotFoundError):
        load_supernet(tmp_path / "missing.pt")  # a missing file is not reported as corrupt


def test_python_dash_m_qfa_uses_the_entry(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "qfa", "search", "--checkpoint", "x.pt", "--predictor", "p.pt"]
        + ["--out", str(tmp_path / "f.png")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("qfa search: error: --out") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["bogus", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_bad_device_names_the_flag(name):
    for pick in (parse_device, resolve_device, pick_device):
        with pytest.raises(ValueError, match="--device"):
            pick(name)
    assert parse_device("cpu") == torch.device("cpu")


# ----------------------------------------------------------------------------- item 2: outputs must differ


def test_predictor_outputs_must_differ_before_training(tmp_path, capsys):
    samples = tmp_path / "missing.jsonl"  # checked later: the outputs are checked first
    same_plot = ["--out", str(tmp_path / "p.pt"), "--plot", str(tmp_path / "p.pt")]
    for extra in (["--out", str(tmp_path / "p.json")], same_plot):
        with pytest.raises(ValueError, match="--out .*--plot .*--report .* must be different files"):
            main(["predictor", "--samples", str(samples), *extra])
    assert list(tmp_path.iterdir()) == []


def test_search_out_and_plot_must_differ_before_loading(tmp_path):
    with pytest.raises(ValueError, match="--out .* and --plot .* must be different files"):
        main(["search", "--checkpoint", "x.pt", "--predictor", "p.pt", "--out", str(tmp_path / "front.png")])
    with pytest.raises(ValueError, match="must be different files"):
        main(["search", "--checkpoint", "x.pt", "--predictor", "p.pt", "--out", str(tmp_path / "a.json")]
             + ["--plot", str(tmp_path / "a.json")])  # fmt: skip


# ----------------------------------------------------------------------------- item 3: eval --json


def test_eval_json_path_checked_before_evaluating(files, tmp_path, capsys):
    base = ["eval", "--checkpoint", str(files["s"]), "--subnets", "min", "--device", "cpu"]
    rc, err = _entry(capsys, [*base, "--json", str(tmp_path)])
    assert rc == 1 and err == f"qfa eval: error: --json {str(tmp_path)!r} is a directory; give a file path\n"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        EvalOptions(checkpoint="s.pt", json=str(tmp_path / "file" / "r.json"))


def test_eval_json_written_atomically_into_a_new_directory(files, tmp_path, monkeypatch, capsys):
    import qfa.commands.eval as eval_cmd

    written = []
    real = eval_cmd.atomic_write_text
    monkeypatch.setattr(eval_cmd, "atomic_write_text", lambda p, t: written.append(p) or real(p, t))
    out = tmp_path / "new" / "r.json"
    argv = ["eval", "--checkpoint", str(files["s"]), "--subnets", "min", "--bits", "3", "--calib-batches", "1"]
    assert entry([*argv, "--batch-size", "64", "--device", "cpu", "--json", str(out)]) == 0
    assert written == [str(out)]
    assert json.loads(out.read_text())["results"][0]["subnet"] == "min w3a3"


# ----------------------------------------------------------------------------- item 4: classes vs --data


@pytest.mark.parametrize("command", ["collect", "search", "export"])
def test_class_count_checked_against_data(files, tmp_path, command):
    argv = [command, "--checkpoint", str(files["s"]), "--data", "synthetic", "--device", "cpu"]
    argv += {
        "collect": ["--out", str(tmp_path / "c.jsonl"), "--num-samples", "1"],
        "search": ["--predictor", str(files["garbage"]), "--out", str(tmp_path / "f.json")],
        "export": ["--subnets", str(files["cfg"]), "--out-dir", str(tmp_path / "ex")],
    }[command]
    with pytest.raises(ValueError, match=r"--checkpoint has 10 classes but --data 'synthetic' has 1000"):
        main(argv)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- item 6: file modes


def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path):
    old = os.umask(0o027)
    try:
        qfa_io.atomic_write_text(tmp_path / "new.txt", "x")
        assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o640
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o640
        (tmp_path / "kept.txt").write_text("old")
        os.chmod(tmp_path / "kept.txt", 0o604)
        qfa_io.atomic_save({"a": 1}, tmp_path / "kept.txt")  # replacing keeps the existing mode
        assert (tmp_path / "kept.txt").stat().st_mode & 0o777 == 0o604
    finally:
        os.umask(old)


# ----------------------------------------------------------------------------- item 7: search --samples


def test_search_missing_samples_fails_before_the_search(tmp_path):
    with pytest.raises(FileNotFoundError, match="--samples"):
        main(["search", "--checkpoint", "x.pt", "--predictor", "p.pt", "--out", str(tmp_path / "f.json")]
             + ["--samples", str(tmp_path / "typo.jsonl")])  # fmt: skip


# ----------------------------------------------------------------------------- item 8: numeric arguments


def test_resolution_outside_the_space_is_rejected(files, tmp_path):
    cfg = qfa.QFAMobileNetV3(n_classes=10, width_mult=0.25, resolutions=RESOLUTIONS).space.full_precision()
    with pytest.raises(ValueError, match=r"--resolution 3 is not one of the supernet's resolutions \[8, 12, 16\]"):
        with_resolution("min", cfg, 3, RESOLUTIONS)
    assert with_resolution("max", cfg, None, RESOLUTIONS).resolution == (cfg.resolution or 16)
    with pytest.raises(ValueError, match="--resolution must be >= 1"):
        EvalOptions(checkpoint="s.pt", resolution=0)
    for res in ("0", "1000"):
        with pytest.raises(ValueError, match=rf"--resolution {res} is not one of .*\[8, 12, 16\]"):
            main(["export", "--checkpoint", str(files["s"]), "--subnets", str(files["cfg"]), "--device", "cpu"]
                 + ["--out-dir", str(tmp_path / "ex"), "--no-onnx", "--resolution", res])  # fmt: skip
    assert not (tmp_path / "ex").exists()


def _fake_samples(path: Path, n: int = 4) -> Path:
    rec = {"space_id": "abc", "space": {}, "config": {"ks": [3]}, "top1": 50.0}
    path.write_text("".join(json.dumps(rec | {"index": i}) + "\n" for i in range(n)))
    return path


def test_predictor_hidden_and_target_checked(tmp_path):
    samples = _fake_samples(tmp_path / "c.jsonl")
    base = ["predictor", "--samples", str(samples), "--out", str(tmp_path / "p.pt")]
    for hidden in ("0", "-3"):
        with pytest.raises(ValueError, match="--hidden widths must be >= 1"):
            main([*base, "--hidden", "8", hidden])
    with pytest.raises(ValueError, match="--target 'config': missing or not a number in 4 record"):
        main([*base, "--target", "config"])
    with pytest.raises(ValueError, match="--device 'bogus'"):
        main([*base, "--device", "bogus"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


# ----------------------------------------------------------------------------- item 9: config files


@pytest.mark.parametrize(
    ("name", "text"), [("c.yaml", "a: [1, 2\nb: :"), ("c.toml", "a = "), ("c.json", "{")]
)  # fmt: skip
def test_config_parse_errors_name_the_flag_and_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"--config '{path}': cannot parse the file"):
        load_config_file(path)


# ----------------------------------------------------------------------------- item 11: metrics.jsonl


def test_metrics_log_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    JsonlLog(path).write({"step": 3})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 1}, {"step": 3}]
    path.write_text('{"step": 1')  # only a torn line
    JsonlLog(path).write({"step": 2})
    assert path.read_text() == '{"step": 2}\n'


# ----------------------------------------------------------------------------- export: one consistent set


def _export(files, out_dir: Path, *extra: str) -> int:
    argv = ["export", "--checkpoint", str(files["s"]), "--subnets", str(files["cfg"]), "--device", "cpu"]
    argv += ["--out-dir", str(out_dir), "--resolution", "16", "--calib-batches", "1", "--batch-size", "32", *extra]
    return main(argv)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_failed_export_leaves_the_previous_export_as_it_was(files, tmp_path, monkeypatch):
    from qfa.commands import export

    out = tmp_path / "ex"
    assert _export(files, out) == 0
    before = _snapshot(out)
    assert set(before) == {"subnet.pt", "subnet.onnx", "subnet.npz", "export.json"}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "save_deployment_npz", full_disk)  # after the new .pt and .onnx exist
    with pytest.raises(OSError, match="No space left"):
        _export(files, out, "--calib-batch-size", "16")
    assert _snapshot(out) == before  # no new subnet.pt beside the old .onnx, no staging leftovers


def test_onnx_beyond_tolerance_fails_on_stderr_and_says_so_in_the_report(files, tmp_path, monkeypatch, capsys):
    import numpy as np

    from qfa.commands import export

    monkeypatch.setattr(export, "run_onnx", lambda path, images: np.zeros((len(images), 10), np.float32))
    out = tmp_path / "ex"
    assert _export(files, out) == 1
    captured = capsys.readouterr()
    expected = "qfa export: error: the ONNX model's logits are within --onnx-atol 0.001 of PyTorch's on 0.0%"
    assert expected in captured.err
    assert "error" not in captured.out
    report = json.loads((out / "export.json").read_text())["onnx"]
    assert report["passed"] is False and report["images_within_atol"] == 0 and report["max_abs_diff"] > 1e-3


def test_onnx_check_tolerates_a_bin_flip_in_a_few_images(files, tmp_path, monkeypatch):
    """An activation at a bin edge may quantize one step away in onnxruntime (spec 4): that moves one
    image's logits by up to a few tenths (2 of 60 random seeds here), which must not fail the export."""
    from qfa.commands import export

    run_onnx = export.run_onnx

    def one_flipped_image(path, images):
        logits = run_onnx(path, images)
        logits[3, 1] += 0.4
        return logits

    monkeypatch.setattr(export, "run_onnx", one_flipped_image)
    out = tmp_path / "ex"
    assert _export(files, out) == 0
    report = json.loads((out / "export.json").read_text())["onnx"]
    assert report["passed"] is True and report["images"] == 32
    assert report["images_within_atol"] == 31 / 32 and report["max_abs_diff"] > 0.39
    assert _export(files, out, "--onnx-min-match", "1") == 1  # all images required: the flip fails it


def test_onnx_check_arguments_are_validated(files, tmp_path):
    with pytest.raises(ValueError, match=r"--onnx-min-match must be in \[0, 1\], got 1.5"):
        _export(files, tmp_path / "ex", "--onnx-min-match", "1.5")
    with pytest.raises(ValueError, match="--onnx-atol must be >= 0, got -1.0"):
        _export(files, tmp_path / "ex", "--onnx-atol", "-1")
    assert not (tmp_path / "ex").exists()


def test_export_removes_what_a_killed_export_left(files, tmp_path):
    out = tmp_path / "ex"
    staging = out / f"{qfa_io.TMP_PREFIX}export-subnet.k1ll3d"
    staging.mkdir(parents=True)
    (staging / "subnet.pt").write_bytes(b"torn")
    (out / f"{qfa_io.TMP_PREFIX}export.json.abc").write_text("{")
    assert _export(files, out, "--no-onnx") == 0
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "subnet.pt"]


def test_export_without_onnx_removes_the_older_onnx_files(files, tmp_path):
    out = tmp_path / "ex"
    assert _export(files, out) == 0
    assert json.loads((out / "export.json").read_text())["onnx"]["passed"] is True
    assert _export(files, out, "--no-onnx") == 0
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "subnet.pt"]
    assert "onnx" not in json.loads((out / "export.json").read_text())
