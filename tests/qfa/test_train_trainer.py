"""qfa.train.Trainer end to end on a tiny supernet: exact resume, non-finite stop, checkpoint errors,
the commands ``qfa train`` / ``qfa eval`` / ``qfa calibrate``."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from qfa.train import distributed, options
from qfa.train.ckpt import CheckpointError, load_training_state
from qfa.train.step import NonFiniteLossError
from qfa.train.trainer import Trainer

# A supernet small enough for a CPU test: 2 blocks per stage, 3 subnets per step, 3 steps per epoch.
TINY = dict(
    data="digits", width_mult=0.25, ks_list=(3, 5), expand_list=(2, 3), depth_list=(1, 2), bits=(2, 4, 32),
    resolutions="16:24:8", batch_size=8, subnets=3, limit_batches=3, epochs=1, warmup_epochs=0, lr=0.05,
    calib_batches=1, val_subnets="max", val_bits=(4,), progress=False, deterministic=True, ckpt_every=2, fp_epochs=1,
    val_every=1,
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_options(out, **changes) -> options.TrainOptions:
    return options.resolve(options.TrainOptions, {**TINY, "out": str(out), **changes})


def make_trainer(out, log=None, **changes) -> Trainer:
    return Trainer(tiny_options(out, **changes), distributed.DistContext(), log=log or (lambda s: None))


def test_warns_when_bn_statistics_come_from_a_handful_of_values(tmp_path):
    """Batch 2 at 16 px: the last stage's BN sees 2 values per channel (its gradients overflowed in a
    real run); the tiny default (batch 8) does not warn."""
    lines: list[str] = []
    make_trainer(tmp_path / "a", log=lines.append, batch_size=2, resolutions="16")
    assert any("BN's batch statistics of the last stage come from 2 values per channel" in ln for ln in lines)
    lines.clear()
    make_trainer(tmp_path / "b", log=lines.append)
    assert not any("BN's batch statistics" in ln for ln in lines)


class _Interrupt(BaseException):
    pass


class _Tripwire(torch.nn.Module):
    """Wraps the criterion: on the ``at``-th call raises ``error`` or returns ``value``."""

    def __init__(self, inner, at: int, error: type[BaseException] | None = None, value: float | None = None):
        super().__init__()
        self.inner, self.at, self.error, self.value, self.calls = inner, at, error, value, 0

    def forward(self, *args):
        self.calls += 1
        loss = self.inner(*args)
        if self.calls == self.at:
            if self.error is not None:
                raise self.error("simulated crash")
            return loss * self.value
        return loss


def _assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def test_interrupted_run_resumes_bit_identically(tmp_path):
    """Uninterrupted vs. crashed mid-step (after a step checkpoint) then ``--resume auto``."""
    full = make_trainer(tmp_path / "a")
    full.fit()
    crash = make_trainer(tmp_path / "b")
    # epoch 1 (--fp-epochs 1): 1 subnet per step, calls 1-3; epoch 2: 3 per step. Call 8 is the second
    # subnet of step 4 (0-based), right after the checkpoint written at the end of step 3.
    crash.criterion = _Tripwire(crash.criterion, at=8, error=_Interrupt)
    with pytest.raises(_Interrupt):
        crash.fit()
    saved = load_training_state(tmp_path / "b" / "last.pt")
    assert (saved["step"], saved["epoch"], saved["batch"]) == (4, 1, 1)  # mid-epoch 2
    lines = []
    resumed = make_trainer(tmp_path / "b", log=lines.append, resume="auto")
    assert resumed.step == 4
    resumed.fit()
    assert any("resuming at epoch 2, batch 1" in line for line in lines)
    _assert_same_state(full.model.state_dict(), resumed.model.state_dict(), "model")
    a, b = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k]["momentum_buffer"], b[k]["momentum_buffer"]) for k in a)
    assert full.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()
    # the weights did train
    init = make_trainer(tmp_path / "c", max_steps=1).model.state_dict()
    assert any(not torch.equal(init[k], v) for k, v in full.model.state_dict().items() if k.endswith("weight"))
    # outputs: metrics log, final supernet; a finished run does not train again
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records if r["event"] != "steps"] == ["start", "epoch", "epoch", "final"]
    assert records[1]["val"][0]["subnet"] == "max" and math.isfinite(records[1]["loss"])
    assert (tmp_path / "a" / "supernet.pt").is_file()
    again = make_trainer(tmp_path / "a")
    assert again.finished and again.step == 6


def test_fp_epochs_have_their_own_warmup_and_lr(tmp_path):
    """--fp-epochs 1 in front: a 1-epoch warmup to --fp-lr (auto: lr x subnets), then the QFA schedule
    from its own start; one process trains the plain module (no DDP)."""
    trainer = make_trainer(tmp_path / "a", fp_lr=0.2, epochs=2)
    assert trainer.net is trainer.model
    factor = trainer.scheduler.lr_lambdas[0]
    assert [factor(s) for s in range(3)] == pytest.approx([4 / 3, 8 / 3, 4.0])  # 0.2 / lr 0.05 = 4
    assert factor(3) == pytest.approx(1.0) and factor(8) < factor(3) and factor(9) == 0.0
    auto = make_trainer(tmp_path / "b", fp_lr=None).scheduler.lr_lambdas[0]  # not the digits preset's
    assert auto(2) == pytest.approx(3.0)  # subnets


def test_non_finite_loss_stops_naming_step_and_subnet(tmp_path):
    trainer = make_trainer(tmp_path, ckpt_every=1)
    trainer.criterion = _Tripwire(trainer.criterion, at=8, value=math.nan)  # step 4 (0-based), subnet 2 of 3
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 4 in subnet 2/3: max subnet"):
        trainer.fit()
    # the newest checkpoint predates the bad update
    assert load_training_state(tmp_path / "last.pt")["step"] == 4


def test_resume_from_a_mismatched_or_corrupt_checkpoint(tmp_path):
    make_trainer(tmp_path, max_steps=1).fit()
    with pytest.raises(CheckpointError, match="different supernet: .*width_mult: checkpoint 0.25 vs this run 0.5"):
        make_trainer(tmp_path, width_mult=0.5)
    with pytest.raises(CheckpointError, match="steps per epoch"):
        make_trainer(tmp_path, limit_batches=2)
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="last.pt.*corrupt"):
        make_trainer(tmp_path)
    make_trainer(tmp_path, resume="none")  # starting over is always possible


def test_phase1_from_phase0_with_external_teacher_and_bf16(tmp_path):
    """``--init`` and ``--teacher`` from a phase-0 supernet.pt; bits 2,4 (phase 1); bf16 autocast."""
    from qfa.train.step import ExternalTeacher
    from qfa.train.weights import QFA_PUBLISHED, QFA_SUPERNET, read_checkpoint

    phase0 = make_trainer(tmp_path / "p0", max_steps=1)
    phase0.fit()
    supernet = tmp_path / "p0" / "supernet.pt"
    assert read_checkpoint(supernet)[0] == QFA_SUPERNET
    lines = []
    phase1 = make_trainer(
        tmp_path / "p1", log=lines.append, bits=(2, 4), init=str(supernet), teacher=str(supernet), amp="bf16",
        max_steps=1, val_bits=(2,), fp_epochs=0,
    )  # fmt: skip
    assert isinstance(phase1.teacher, ExternalTeacher) and not phase1.teacher.model.training
    start = phase1.model.state_dict()
    for k, v in phase0.model.state_dict().items():
        assert torch.equal(v, start[k]), f"--init did not load {k}"
    summary = phase1.fit()
    assert any("initialised from" in line for line in lines) and any("recalibrated" in line for line in lines)
    assert [r["bits"] for r in summary["results"]] == [2, 4]  # no 32 in phase 1
    assert all(math.isfinite(r["loss"]) for r in summary["results"])
    # a published-QFA style state dict is recognised by its quantizer keys
    published = tmp_path / "b234_ps.pth"
    torch.save({"state_dict": {"first_conv.conv.w_quantizer.quantizers.2.scale": torch.ones(1)}}, published)
    assert read_checkpoint(published)[0] == QFA_PUBLISHED
    with pytest.raises(CheckpointError, match="does not fit this supernet"):
        make_trainer(tmp_path / "p2", init=str(published))


def test_commands_train_eval_calibrate(tmp_path, capsys):
    from qfa.commands import calibrate as calibrate_cmd
    from qfa.commands import eval as eval_cmd
    from qfa.commands import train as train_cmd

    config = tmp_path / "tiny.yaml"
    config.write_text("\n".join(f"{k}: {json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in TINY.items()))
    out = tmp_path / "run"
    args = argparse.Namespace(config=str(config), out=str(out), max_steps=2, deterministic=False)
    assert train_cmd.run(args) == 0
    text = capsys.readouterr().out
    assert "epoch 1/2: loss" in text and "final: recalibrated subnets" in text
    ckpt = str(out / "supernet.pt")
    assert eval_cmd.run(argparse.Namespace(ckpt=ckpt, subnets="min,max", bits=(2,), calib_batches=1)) == 0
    text = capsys.readouterr().out
    assert "min w2a2" in text and "max w2a2" in text and "top1" in text
    target = tmp_path / "cal.pt"
    args = argparse.Namespace(ckpt=ckpt, subnets="min", bits=(4,), calib_batches=1, out=str(target))
    assert calibrate_cmd.run(args) == 0
    from qfa.checkpoint import load_supernet

    model, extra = load_supernet(target, return_extra=True)
    assert extra["subnet"]["resolution"] == 16 and set(extra["subnet"]["w_bits"][:-1]) == {4}
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        eval_cmd.run(argparse.Namespace(checkpoint=str(tmp_path / "missing.pt")))
