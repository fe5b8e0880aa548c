"""The ``qfa`` command surface (issue 14): one flag dialect, one checkpoint loader, and the bugs a new
user hit. Each test fails on the code before the issue was fixed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import qfa
from qfa.checkpoint import save_supernet
from qfa.cli import build_parser, entry, main

RESOLUTIONS = (8, 12, 16)
pytestmark = pytest.mark.usefixtures("one_thread")


def _entry(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = entry(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ----------------------------------------------------------------------------- bug 1: class lists by name


def _image_tree(root: Path, train: list[str], val: list[str]) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes in (("train", train), ("val", val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_val_classes_must_match_train_by_name(tmp_path, capsys):
    from qfa.data import build_loaders

    data = _image_tree(tmp_path / "d", ["a", "b", "c"], ["a", "c", "z"])
    with pytest.raises(ValueError, match=r"val/ lacks \['b'\], val/ has extra \['z'\]"):
        build_loaders(str(data), batch_size=2, resolution=8, workers=0)
    rc, _, err = _entry(capsys, ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert rc == 1 and err.startswith("qfa train: error: ") and "lacks ['b']" in err and err.count("\n") == 1
    train, val = build_loaders(str(_image_tree(tmp_path / "ok", ["a", "b"], ["a", "b"])), 2, 8, workers=0)
    assert train.num_classes == val.num_classes == 2


# ----------------------------------------------------------------------------- a tiny training run

TRAIN = ["--data", "digits", "--width-mult", "0.25", "--ks-list", "3,5", "--expand-list", "2,3", "--depth-list", "1,2",
         "--bits", "2,4", "--resolutions", "16:24:8", "--batch-size", "8", "--subnets", "3", "--limit-batches", "3",
         "--epochs", "1", "--warmup-epochs", "0", "--fp-epochs", "0", "--calib-batches", "2", "--val-every", "0",
         "--no-progress", "--channels-last", "--device", "cpu", "--lr", "0.05"]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """``qfa train`` of a tiny supernet (channels_last like the digits preset, 2 recalibration batches)."""
    out = tmp_path_factory.mktemp("train") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *TRAIN, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    return out


def _final_rows(out: Path) -> list[dict]:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "final"][-1]["results"]


def test_eval_reproduces_the_final_table_of_train(run_dir, tmp_path, capsys):
    """No flag but the checkpoint: eval takes the run's data, batch size, recalibration settings and
    memory format from it, and measures what train's final table says, to the last digit."""
    report = tmp_path / "r.json"
    assert main(["eval", "--checkpoint", str(run_dir / "supernet.pt"), "--device", "cpu", "--json", str(report)]) == 0
    got = {(r["res"], r["bits"]): (r["top1"], r["loss"]) for r in json.loads(report.read_text())["results"]}
    want = {(r["res"], str(r["bits"])): (r["top1"], r["loss"]) for r in _final_rows(run_dir)}
    assert got == want
    supernet = qfa.checkpoint.load_any(run_dir / "supernet.pt")
    assert supernet.run == {"data": "digits", "batch_size": 8, "calib_batches": 2, "seed": 0, "channels_last": True}


def test_every_command_loads_every_checkpoint_kind(run_dir, files, tmp_path):
    """One loader: collect / search / export take train's last.pt (they refused it), with the run's
    data settings (not 256 / 30) as defaults."""
    from qfa.search.runtime import load_model

    for name in ("supernet.pt", "last.pt"):
        loaded = qfa.checkpoint.load_any(run_dir / name)
        assert loaded.layout in ("qfa supernet", "qfa training") and loaded.run["batch_size"] == 8
        for command in ("collect", "search", "export"):
            extra = {"collect": ["--out", "c.jsonl", "--num-samples", "1"], "search": ["--predictor", "p.pt", "--out",
                     "f.json"], "export": ["--out-dir", "ex"]}[command]  # fmt: skip
            args = build_parser().parse_args([command, "--checkpoint", str(run_dir / name), *extra])
            model = load_model(args, torch.device("cpu"))
            assert model.space.resolutions == (16, 24)
            assert (args.data, args.batch_size, args.calib_batches, args.calib_batch_size) == ("digits", 8, 2, 8)
            assert args.channels_last is True
    # A checkpoint that stores no run: the digits preset's settings, not the published 256 / 30
    args = build_parser().parse_args(["export", "--checkpoint", str(files["s"]), "--out-dir", "ex"])
    load_model(args, torch.device("cpu"))
    assert (args.data, args.batch_size, args.calib_batches, args.calib_batch_size) == ("digits", 64, 8, 64)
    assert args.channels_last is False and args.data_seed == 0
    out = tmp_path / "c.jsonl"
    argv = ["collect", "--checkpoint", str(run_dir / "last.pt"), "--out", str(out), "--num-samples", "1"]
    assert main([*argv, "--device", "cpu", "--no-progress"]) == 0
    assert len(out.read_text().splitlines()) == 1


def test_calibrate_output_plugs_into_export(run_dir, tmp_path, capsys):
    calibrated, report = tmp_path / "max4.pt", tmp_path / "cal.json"
    argv = ["calibrate", "--checkpoint", str(run_dir / "supernet.pt"), "--subnets", "max", "--bits", "4"]
    assert main([*argv, "--device", "cpu", "--out", str(calibrated), "--json", str(report)]) == 0
    rows = json.loads(report.read_text())["results"]  # bug 3: --json was never written
    assert [r["subnet"] for r in rows] == ["max w4a4"]
    assert f"qfa export --checkpoint {calibrated}" in capsys.readouterr().out
    ex = tmp_path / "ex"
    assert main(["export", "--checkpoint", str(calibrated), "--out-dir", str(ex), "--no-onnx", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert json.loads((ex / "export.json").read_text())["config"] == rows[0]["config"]
    # friction: one summary line, not the report's JSON
    assert out.count("\n") == 1 and out.startswith("exported subnet.pt to ") and "{" not in out
    rc, _, err = _entry(capsys, ["export", "--checkpoint", str(run_dir / "supernet.pt"), "--out-dir", str(ex)])
    assert rc == 1 and "--subnets is required" in err


# ----------------------------------------------------------------------------- Ctrl-C and resume


def _tiny_trainer(out: Path, **changes):
    from qfa.train import distributed, options
    from qfa.train.trainer import Trainer

    args = build_parser().parse_args(["train", *TRAIN, "--out", str(out), "--ckpt-every", "1", "--deterministic"])
    values = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"} | changes
    return Trainer(options.resolve(options.TrainOptions, values), distributed.DistContext(), log=lambda s: None)


def _epoch_records(out: Path) -> list[dict]:
    return [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e["event"] == "epoch"]


def test_ctrl_c_saves_and_exits_130_and_the_resumed_run_logs_the_same_epoch(tmp_path, monkeypatch, capsys):
    import os
    import signal

    from qfa.train.trainer import Trainer

    torch.set_num_threads(1)
    whole = _tiny_trainer(tmp_path / "whole")
    whole.fit()
    real_step = Trainer.train_step

    def step_then_ctrl_c(self, images, labels):
        plan = real_step(self, images, labels)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; the step in flight completes
        return plan

    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    out = tmp_path / "cut"
    try:
        rc, _, err = _entry(capsys, ["train", *TRAIN, "--out", str(out), "--ckpt-every", "1", "--deterministic"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped qfa train as a KeyboardInterrupt (a traceback for the user)")
    assert rc == 130
    assert err.startswith("qfa train: interrupted at step 2") and "resume" in err and err.count("\n") == 1
    state = torch.load(out / "last.pt", weights_only=True)
    assert (state["step"], state["batch"]) == (2, 2)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    resumed = _tiny_trainer(out)
    resumed.fit()
    cut, full = _epoch_records(out)[-1], _epoch_records(tmp_path / "whole")[-1]
    assert cut["step"] == full["step"] == 3
    for key in ("loss", "loss_min", "loss_max", "loss_random", "grad_norm"):
        assert cut[key] == pytest.approx(full[key], rel=1e-12), key  # not the mean of the last step alone


# ----------------------------------------------------------------------------- one flag dialect


def _subparsers():
    import argparse

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_one_flag_dialect_and_every_option_has_help():
    import argparse

    for name, sub in _subparsers().items():
        flags = {s: a for a in sub._actions for s in a.option_strings}
        if name in ("calibrate", "eval", "collect", "search", "export"):
            assert flags["--checkpoint"].dest == "checkpoint", name
            assert flags["--ckpt"].dest == "checkpoint" and flags["--ckpt"].help == argparse.SUPPRESS, name
            assert "--ckpt" not in sub.format_help(), name
        assert "--ckpt" not in {s for a in sub._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
        if "--config" in flags and flags["--config"].help != argparse.SUPPRESS:
            assert "YAML" in flags["--config"].help, f"{name}: --config is for option files only"
        for action in sub._actions:
            assert action.help, f"qfa {name} {action.option_strings}: no help text"
    assert "--subnets" in _subparsers()["export"].format_help()


def test_old_spellings_still_work(files, tmp_path, capsys):
    argv = ["eval", "--ckpt", str(files["s"]), "--subnets", "min", "--bits", "4", "--calib-batches", "1"]
    assert main([*argv, "--device", "cpu", "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["checkpoint"] == str(files["s"])
    config = tmp_path / "opts.yaml"
    config.write_text(f"ckpt: {files['s']}\nsubnets: min\nbits: [4]\ncalib_batches: 1\n")
    assert main(["eval", "--config", str(config), "--device", "cpu"]) == 0
    rc, _, err = _entry(capsys, ["export", "--checkpoint", str(files["s"]), "--config", str(files["cfg"]),
                                 "--out-dir", str(tmp_path / "ex")])  # fmt: skip
    assert rc == 1 and "--config is for option files: give the subnet config with --subnets FILE" in err
    assert not (tmp_path / "ex").exists()


# ----------------------------------------------------------------------------- bug 7: resolution of a config


def test_config_resolution_outside_the_space(files, tmp_path, capsys):
    cfg = json.loads(files["cfg"].read_text()) | {"resolution": 20}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(cfg))
    rc, _, err = _entry(capsys, ["eval", "--checkpoint", str(files["s"]), "--subnets", str(bad), "--device", "cpu"])
    assert rc == 1 and "its resolution 20 is not one of the supernet's resolutions [8, 12, 16]" in err
    rc, _, err = _entry(capsys, ["export", "--checkpoint", str(files["s"]), "--subnets", str(bad), "--device", "cpu",
                                 "--out-dir", str(tmp_path / "ex"), "--no-onnx"])  # fmt: skip
    assert rc == 1 and "its resolution 20 is not one of" in err and "--resolution 20" not in err
    assert not (tmp_path / "ex").exists()


# ----------------------------------------------------------------------------- messages that name the input


def test_bits_outside_the_space_names_the_flag(files, capsys):
    rc, _, err = _entry(capsys, ["eval", "--checkpoint", str(files["s"]), "--bits", "5", "--device", "cpu"])
    assert rc == 1 and err == "qfa eval: error: --bits 5 is not one of the supernet's bit-widths [2, 3, 4]\n"


def test_non_utf8_input_files_are_named(files, tmp_path, capsys):
    bad = tmp_path / "latin1.json"
    bad.write_bytes(json.dumps({"note": "caf\xe9"}, ensure_ascii=False).encode("latin-1"))
    for command in (["eval", "--subnets", str(bad)], ["export", "--subnets", str(bad), "--out-dir", str(tmp_path)]):
        rc, _, err = _entry(capsys, [command[0], "--checkpoint", str(files["s"]), "--device", "cpu", *command[1:]])
        assert rc == 1 and f"--subnets {str(bad)!r}: not a UTF-8 text file" in err, err
    samples = tmp_path / "c.jsonl"
    samples.write_bytes(b'{"index": 0, "note": "caf\xe9"}\n')
    rc, _, err = _entry(capsys, ["predictor", "--samples", str(samples), "--out", str(tmp_path / "p.pt")])
    assert rc == 1 and f"{samples}:1: not UTF-8 text" in err


def test_bad_backend_variable_is_named(monkeypatch):
    from bquant_kernels import BatchQuantizer

    monkeypatch.setenv("BQUANT_BACKEND", "garbage")
    with pytest.raises(ValueError, match="environment variable BQUANT_BACKEND='garbage': use one of"):
        BatchQuantizer(4)(torch.randn(2, 3))


# ----------------------------------------------------------------------------- predictor


def _records(n: int, **changes) -> list[dict]:
    rng = np.random.default_rng(0)
    model = qfa.QFAMobileNetV3(n_classes=10, width_mult=0.25, resolutions=RESOLUTIONS)
    from qfa.search.records import space_id
    from qfa.search.sampling import SamplingMix, sample_config, sample_rng
    from qfa.search.space import space_to_dict

    space = space_to_dict(model.space)
    out = []
    for i in range(n):
        cfg = sample_config(model.space, sample_rng(0, i), SamplingMix())
        out.append({"index": i, "seed": 0, "space_id": space_id(space), "space": space, "config": cfg.to_dict(),
                    "top1": float(rng.uniform(10, 90)), "supernet": "aaaa"} | changes)  # fmt: skip
    return out


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _predictor(capsys, samples: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return _entry(capsys, ["predictor", "--samples", str(samples), "--out", str(out), "--epochs", "2",
                           "--hidden", "8", *extra])  # fmt: skip


def test_predictor_rejects_bad_training_sets(tmp_path, capsys):
    records = _records(8)
    no_config = [dict(r) for r in records]
    del no_config[3]["config"]
    cases = {
        "no_config": (no_config, "1 record(s) without a 'config' dict (e.g. record 4)"),  # bug 5: was a KeyError
        "duplicate": (records + [records[2]], "records 3 and 9 are the same sample (seed 0, index 2)"),
        "two_supernets": (records[:4] + [r | {"supernet": "bbbb"} for r in records[4:]], "2 different supernets"),
    }
    for name, (recs, message) in cases.items():
        rc, _, err = _predictor(capsys, _write(tmp_path / f"{name}.jsonl", recs), tmp_path / f"{name}.pt")
        assert rc == 1 and err.startswith("qfa predictor: error: ") and message in err and err.count("\n") == 1, err
    assert not list(tmp_path.glob("*.pt"))


def test_predictor_warns_when_no_better_than_constant_and_writes_strict_json(tmp_path, capsys):
    samples = _write(tmp_path / "c.jsonl", [r | {"top1": 50.0} for r in _records(10)])  # nothing to learn
    rc, _, err = _predictor(capsys, samples, tmp_path / "p.pt")
    assert rc == 0 and "qfa predictor: warning: the held-out RMSE" in err and "not better than a constant" in err
    text = (tmp_path / "p.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    report = json.loads(text)
    assert report["held_out"]["kendall_tau"] is None  # constant targets: undefined, not NaN


def test_collect_records_name_their_supernet(files, tmp_path):
    out = tmp_path / "c.jsonl"
    argv = ["collect", "--checkpoint", str(files["s"]), "--out", str(out), "--num-samples", "1", "--device", "cpu"]
    argv += ["--calib-batches", "1", "--batch-size", "128", "--no-progress"]
    assert main(argv) == 0
    model = qfa.checkpoint.load_supernet(files["s"])
    assert json.loads(out.read_text())["supernet"] == qfa.checkpoint.weights_id(model)
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    save_supernet(qfa.QFAMobileNetV3(n_classes=10, width_mult=0.25, resolutions=RESOLUTIONS), other)
    argv[2] = str(other)
    argv[argv.index("--num-samples") + 1] = "2"
    with pytest.raises(ValueError, match="holds samples of another supernet"):
        main(argv)


# ----------------------------------------------------------------------------- BatchQuantizer ranges


def test_uncalibrated_batchquantizer_in_eval_mode_is_an_error():
    from bquant_kernels import BatchQuantizer, recalibrate

    q = BatchQuantizer(4).eval()
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(RuntimeError, match=r"never calibrated \(its range is \[0, 0\]\): run .*recalibrate"):
        q(x)
    with recalibrate(q):
        q(x)
    assert q(x).shape == x.shape and q.lo_hi[1] > 0
    fresh = BatchQuantizer(4).eval()
    fresh.load_state_dict(BatchQuantizer(4).state_dict())  # a zero range loaded: still uncalibrated
    with pytest.raises(RuntimeError, match="never calibrated"):
        fresh(x)
    fresh.load_state_dict(q.state_dict())
    torch.testing.assert_close(fresh(x), q(x))


def test_nan_batch_in_recalibrate_is_an_error_and_keeps_the_range():
    from bquant_kernels import recalibrate

    model = qfa.QFAMobileNetV3(n_classes=10, width_mult=0.25, resolutions=RESOLUTIONS)
    model.set_active_config(model.space.make_config(ks=3, e=3, d=2, w_bits=4, a_bits=4, resolution=8))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), recalibrate(model):
        model(x)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("lo_hi")}
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"range of \d+ BatchQuantizer\(s\) is not finite \(e.g. blocks\.0\."):
        with torch.no_grad(), recalibrate(model):
            model(x)
    after = {k: v for k, v in model.state_dict().items() if k.endswith("lo_hi")}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ctrl_c_in_any_command_is_one_line_and_130(monkeypatch, tmp_path, capsys):
    from qfa.commands import collect

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(collect, "run", interrupted)
    rc, _, err = _entry(capsys, ["collect", "--checkpoint", "x", "--out", str(tmp_path / "c"), "--num-samples", "1"])
    assert rc == 130 and err == "qfa collect: interrupted\n"
