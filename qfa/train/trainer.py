"""The supernet trainer behind ``qfa train`` (docs/spec-qfa-supernet.md section 5)."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import data as qdata
from ..calibrate import calibrate
from ..checkpoint import RUN_KEYS
from ..evaluate import evaluate_subnet
from ..networks import QFAMobileNetV3
from . import ckpt, distributed
from .losses import DistillationLoss
from .optim import build_optimizer, phased_warmup_cosine
from .options import TrainOptions
from .report import JsonlLog, format_table
from .step import (
    ExternalTeacher,
    InplaceTeacher,
    NonFiniteGuard,
    PlannedSubnet,
    plan_full_precision,
    plan_subnets,
    step_rng,
)
from .weights import load_initial_weights, load_teacher, save_trained_supernet

TABLE_COLUMNS = ("subnet", "bits", "res", "top1", "top5", "loss")
VAL_BATCH = 128  # evaluation needs no gradients: larger batches, fewer calls
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Fewer values per channel than this in the last stage's BN batch statistics get a warning: with a
# handful the variance is often 0 (gain gamma / sqrt(eps), ~316, per BN backward) and the gradient
# overflows after a dozen layers (docs/known-issues.md: batch 2 at 16 px).
MIN_BN_VALUES = 8


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """Deterministic kernels while training (restored afterwards, so library users are unaffected)."""
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark = previous[1]


class TrainingInterrupted(Exception):
    """Ctrl-C (SIGINT) stopped training at a step boundary; the checkpoint is written."""


@contextlib.contextmanager
def stop_on_sigint(request_stop: Callable[[], None]) -> Iterator[None]:
    """While the block runs, the first Ctrl-C calls ``request_stop`` (the trainer stops at the next step
    boundary and saves); a second one interrupts at once. Only the main thread can own signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C: the usual KeyboardInterrupt
        request_stop()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def build_supernet(opts: TrainOptions, n_classes: int) -> nn.Module:
    model = QFAMobileNetV3(**opts.model_config(n_classes), backend=opts.backend, resolutions=opts.resolution_list)
    model.fused_epilogue = opts.fused_epilogue
    return model


def val_configs(model: nn.Module, kinds: list[str], bits: list[int], resolutions: tuple[int, ...]) -> list[dict]:
    """The validation subnets: for each kind (``min``: smallest ks, e, d at the smallest resolution;
    ``max``: largest at the largest) and each bit-width (every quantized layer; classifier per spec 3)."""
    space = model.space
    out = []
    for kind in kinds:
        pick = min if kind == "min" else max
        for b in bits:
            cfg = space.make_config(
                ks=pick(space.ks_list),
                e=pick(space.expand_list),
                d=pick(space.depth_list),
                w_bits=b,
                a_bits=b,
                resolution=pick(resolutions),
            )
            out.append({"subnet": kind, "bits": b, "res": cfg.resolution, "config": cfg})
    return out


class Trainer:
    """Trains a QFA supernet: per step, the min, max and random subnets of one batch (each at its own
    resolution, resized on the device), label-smoothed CE + distillation, gradients summed, one SGD
    step; per-epoch recalibrated validation; atomic checkpoints that resume bit-exactly.

    Args:
        opts: resolved :class:`TrainOptions`.
        ctx: the process's rank/device (default: from ``torchrun``'s environment, see
            :func:`qfa.train.distributed.setup`).
        model: an already-built supernet (default: built from ``opts``).
        log: where rank 0 prints progress lines.
    """

    def __init__(
        self,
        opts: TrainOptions,
        ctx: distributed.DistContext | None = None,
        *,
        model: nn.Module | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.opts = opts
        self.ctx = ctx or distributed.setup(opts.device)
        self.device = self.ctx.device
        self._log = log
        self.out = Path(opts.out)
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temps(self.out)
        torch.manual_seed(opts.seed)  # same initial weights on every rank (then broadcast anyway)

        self.train_loader, self.val_loader = qdata.build_loaders(
            opts.data, opts.batch_size, opts.max_resolution, opts.workers, self.ctx.distributed, opts.seed,
            device=self.device, channels_last=opts.channels_last, val_batch_size=max(opts.batch_size, VAL_BATCH),
        )  # fmt: skip
        self.calib_loader = qdata.calib_loader(
            opts.data, opts.batch_size, opts.max_resolution, opts.calib_batches, opts.workers,
            self.ctx.distributed, opts.seed, device=self.device, channels_last=opts.channels_last,
        )  # fmt: skip
        self.n_classes = self.train_loader.num_classes

        self.model = model if model is not None else build_supernet(opts, self.n_classes)
        if opts.init:
            self.info(load_initial_weights(self.model, opts.init))
        memory_format = torch.channels_last if opts.channels_last else torch.preserve_format
        self.model.to(device=self.device, memory_format=memory_format)
        self.model.train()
        min_res = min(opts.resolution_list)
        last_stage_values = opts.batch_size * math.ceil(min_res / 32) ** 2  # its maps: stride 32
        if last_stage_values < MIN_BN_VALUES:
            self.info(
                f"warning: BN's batch statistics of the last stage come from {last_stage_values} values per "
                f"channel (--batch-size {opts.batch_size} at {min_res} px); gradients may overflow, use a larger "
                "batch or resolution"
            )
        self.teacher = self._build_teacher()
        self.criterion: nn.Module = DistillationLoss(opts.label_smoothing, opts.kd_ratio, opts.kd_temperature)

        self.steps_per_epoch = min(len(self.train_loader), opts.limit_batches or len(self.train_loader))
        self.total_epochs = opts.fp_epochs + opts.warmup_epochs + opts.epochs
        self.total_steps = self.total_epochs * self.steps_per_epoch
        self.lr = opts.lr * self.ctx.world_size
        self.optimizer = build_optimizer(
            self.model, self.lr, momentum=opts.momentum, weight_decay=opts.weight_decay, nesterov=opts.nesterov
        )
        spe = self.steps_per_epoch
        phases = [((opts.warmup_epochs + opts.epochs) * spe, opts.warmup_epochs * spe, 1.0)]
        if opts.fp_epochs:
            # By default one network instead of a sum over `subnets`: the same step per unit of gradient.
            fp_scale = opts.fp_lr / opts.lr if opts.fp_lr else float(opts.subnets)
            phases.insert(0, (opts.fp_epochs * spe, min(spe, opts.fp_epochs * spe), fp_scale))
        self.scheduler = phased_warmup_cosine(self.optimizer, phases)
        self.amp_dtype = AMP_DTYPES[opts.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=opts.amp == "fp16")
        self.guard = NonFiniteGuard(self.device)
        self.metrics = JsonlLog(self.out / "metrics.jsonl" if self.ctx.is_main else None)

        self.epoch, self.batch, self.step = 0, 0, 0  # next epoch / batch in it; completed optimiser steps
        # Running loss sums of the current epoch (saved in checkpoints: a resumed epoch logs its whole mean).
        self.epoch_sums: dict[str, Any] | None = None
        self.stop_requested = False
        self.window: list[tuple[int, list[float], float]] = []  # checked step records not yet logged
        self.history: list[dict[str, Any]] = []
        resume_from = ckpt.resolve_resume_on_all_ranks(opts.resume, self.out, self.ctx)
        if resume_from is not None:
            self._load(resume_from)
        distributed.broadcast_module(self.model, self.ctx)
        # The training forward goes through DDP when distributed; everything else uses self.model.
        self.net = distributed.wrap_ddp(self.model, self.ctx)

    # ------------------------------------------------------------------ helpers

    def info(self, message: str) -> None:
        if self.ctx.is_main and message:
            self._log(message)

    def _build_teacher(self):
        if self.opts.kd_ratio == 0:
            return None
        if self.opts.teacher is None:
            return InplaceTeacher(self.model)
        teacher, needs_calibration, note = load_teacher(self.opts.teacher, self.model, self.device)
        self.info(note)
        if needs_calibration:
            calibrate(teacher, self.calib_loader, self.opts.calib_batches, resolution=self.opts.max_resolution)
            self.info("  (its BN statistics were recalibrated for the full-precision max subnet)")
        if self.opts.channels_last:
            teacher.to(memory_format=torch.channels_last)
        return ExternalTeacher(teacher)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _rng_devices(self) -> list[int]:
        return [self.device.index or 0] if self.device.type == "cuda" else []

    @property
    def fp_phase(self) -> bool:
        """Whether this epoch trains the full-precision supernet (``--fp-epochs``)."""
        return self.epoch < self.opts.fp_epochs

    @property
    def finished(self) -> bool:
        return self.epoch >= self.total_epochs or (self.opts.max_steps is not None and self.step >= self.opts.max_steps)

    # ------------------------------------------------------------------ the step

    def train_step(self, images: Tensor, labels: Tensor) -> list[PlannedSubnet]:
        """One optimiser step on one batch (images at the largest resolution); returns the subnets trained."""
        opts, model = self.opts, self.model
        if self.fp_phase:
            plan, teacher = plan_full_precision(model, opts.resolution_list), None
        else:
            plan, teacher = (
                plan_subnets(model, step_rng(opts.seed, self.step), opts.subnets, opts.resolution_list),
                self.teacher,
            )
        fmt = torch.channels_last if opts.channels_last else torch.contiguous_format
        teacher_logits: dict[int, Tensor] = {}  # the teacher does not change within a step: once per resolution
        losses = []
        for i, sub in enumerate(plan):
            res = sub.config.resolution
            x = qdata.resize(images, res).contiguous(memory_format=fmt)
            with self._autocast():
                if teacher is not None and res not in teacher_logits:
                    teacher_logits[res] = teacher(x)
            model.set_active_config(sub.config)
            # DDP: gradients accumulate locally (no_sync) until the last subnet's backward all-reduces them.
            with distributed.sync_unless(self.net, accumulate=i < len(plan) - 1):
                with self._autocast():
                    logits = self.net(x)
                loss = self.criterion(logits, labels, teacher_logits.get(res))
                self.scaler.scale(loss).backward()  # gradients of the subnets add up
            losses.append(loss.detach())
        loss_vec = torch.stack(losses)
        # Under torchrun each rank gets Ctrl-C at its own moment: its flag rides in the losses' all-reduce
        # (the same bucket, no extra collective), so every rank reads the same vote after the same step.
        stop_vote = loss_vec.new_full((1,), float(self.stop_requested)) if self.ctx.distributed else None
        reduced = [loss_vec] if stop_vote is None else [loss_vec, stop_vote]
        distributed.all_reduce_mean(reduced, self.ctx.world_size)  # all ranks see the mean losses
        grad_norm = None
        if opts.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for p in model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, opts.clip_grad_norm, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        # With fp16 an inf gradient norm only makes the scaler skip the step: not an error.
        self.guard.push(self.step, plan, loss_vec, None if self.scaler.is_enabled() else grad_norm, stop_vote)
        self.step += 1
        return plan

    # ------------------------------------------------------------------ validation

    def validation_bits(self, final: bool = False) -> list[int]:
        if self.fp_phase and not final:
            return [32]
        if self.opts.val_bits and not final:
            return list(self.opts.val_bits)
        quantized = sorted(b for b in self.opts.bits if b != 32)
        bits = quantized if final else sorted({quantized[0], quantized[-1]}) if quantized else []
        return bits + ([32] if 32 in self.opts.bits else [])

    def validate(self, final: bool = False) -> list[dict[str, Any]]:
        """Recalibrate and evaluate the min/max subnets at the validation bit-widths; rows of metrics.

        Runs under a forked RNG, so validating never changes the training run's random stream.
        """
        kinds = ["max"] if self.fp_phase and not final else self.opts.val_subnets.split(",")
        rows = []
        with torch.random.fork_rng(devices=self._rng_devices()):
            for row in val_configs(self.model, kinds, self.validation_bits(final), self.opts.resolution_list):
                metrics = evaluate_subnet(
                    self.model, row.pop("config"), self.calib_loader, self.val_loader, self.opts.calib_batches
                )
                rows.append({**row, **{k: metrics[k] for k in ("top1", "top5", "loss")}})
        self.model.train()
        return rows

    # ------------------------------------------------------------------ loop

    def request_stop(self) -> None:
        """Stop at the next step boundary: save the checkpoint and raise :class:`TrainingInterrupted`.

        With several processes every rank stops at the same boundary, the first one after the ranks'
        vote (see :meth:`train_step`) is read back with the losses: one or two steps later."""
        self.stop_requested = True

    @property
    def stopping(self) -> bool:
        """Whether to stop at this step boundary: this process's own request when it is alone, else the
        ranks' vote, which every rank reads at the same step (so none is left in a collective)."""
        return self.guard.stop_voted if self.ctx.distributed else self.stop_requested

    def fit(self) -> dict[str, Any]:
        """Train to the end (or ``max_steps``), then evaluate; returns the summary (also in metrics.jsonl).
        Ctrl-C stops at the next step boundary, saves ``OUT/last.pt`` and raises :class:`TrainingInterrupted`."""
        opts = self.opts
        with deterministic_mode(opts.deterministic), stop_on_sigint(self.request_stop):
            if self.step == 0 and self.epoch == 0 and self.batch == 0:
                self.info(self._banner())
                self.metrics.write({"event": "start", "options": opts.to_dict(), "world_size": self.ctx.world_size})
            elif not self.finished:
                self.info(f"resuming at epoch {self.epoch + 1}, batch {self.batch} (step {self.step})")
            else:
                self.info(f"training in {self.out} is already complete (step {self.step}); evaluating it again "
                          "(use --resume none or another --out to train anew)")  # fmt: skip
            while not self.finished:
                self._train_epoch()
                if self.stopping:
                    raise TrainingInterrupted(
                        f"interrupted at step {self.step} (epoch {self.epoch + 1}, batch {self.batch}); saved "
                        f"{self.out / ckpt.LAST}: run the same command again to resume from it"
                    )
            self.guard.flush()
            rows = self.validate(final=True)
        summary = {"event": "final", "epoch": self.epoch, "step": self.step, "results": rows}
        self.metrics.write(summary)
        self.info(format_table(rows, TABLE_COLUMNS, title="final: recalibrated subnets on the held-out set"))
        self._save_supernet(rows)
        return summary

    def _train_epoch(self) -> None:
        opts, epoch = self.opts, self.epoch
        self.train_loader.set_epoch(epoch, self.batch)
        steps = self.steps_per_epoch - self.batch
        if opts.max_steps is not None:
            steps = min(steps, opts.max_steps - self.step)
        bar = self._progress(steps, f"epoch {epoch + 1}/{self.total_epochs}")
        self.window = []
        start = time.perf_counter()
        for images, labels in itertools.islice(self.train_loader, max(0, steps)):
            plan = self.train_step(images, labels)
            self.batch += 1
            if bar is not None:
                bar.update(1)
            self._drain()
            if self.window and self.step % opts.log_every == 0:
                self._log_steps(self.window[-opts.log_every :], plan, bar)
                self.window = []
            if opts.ckpt_every and self.step % opts.ckpt_every == 0:
                self.save()
            if self.stopping:
                break
        self.guard.flush()
        self._drain()
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - start
        epoch_done = self.batch >= self.steps_per_epoch
        kinds = ["fp-max"] if self.fp_phase else plan_kinds(opts.subnets)
        sums = self.epoch_sums or {"n": 0, "losses": [], "grad_norm": 0.0}
        record = {
            "event": "epoch", "epoch": epoch + 1, "step": self.step, "time_s": round(elapsed, 3),
            "lr": self.scheduler.get_last_lr()[0], **_summary_of_sums(sums, kinds),
        }  # fmt: skip
        line = self._epoch_line(record, sums["n"]) + (" [full-precision max network]" if self.fp_phase else "")
        self.info(line)
        last_epoch = epoch + 1 >= self.total_epochs
        if epoch_done and opts.val_every and ((epoch + 1) % opts.val_every == 0) and not last_epoch:
            rows = self.validate()
            record["val"] = rows
            self.info(format_table(rows, TABLE_COLUMNS, title=f"epoch {epoch + 1}: recalibrated subnets"))
        self.metrics.write(record)
        self.history.append(record)
        if epoch_done:
            self.epoch, self.batch = epoch + 1, 0
            self.epoch_sums = None
        self.save()

    # ------------------------------------------------------------------ logging

    def _progress(self, total: int, desc: str):
        if not (self.ctx.is_main and self.opts.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, mininterval=1.0)

    def _log_steps(self, records, plan, bar) -> None:
        summary = self._loss_summary(records, [p.kind for p in plan])
        lr = self.scheduler.get_last_lr()[0]
        self.metrics.write({"event": "steps", "step": self.step, "lr": lr, **summary})
        if bar is not None:
            bar.set_postfix(loss=f"{summary['loss']:.3f}", lr=f"{lr:.2e}", refresh=False)

    def _drain(self) -> None:
        """Move the guard's checked records into the epoch's running sums and the logging window."""
        records = self.guard.drain()
        self.window += records
        for _, losses, grad_norm in records:
            if self.epoch_sums is None:
                self.epoch_sums = {"n": 0, "losses": [0.0] * len(losses), "grad_norm": 0.0}
            sums = self.epoch_sums
            sums["n"] += 1
            sums["losses"] = [a + b for a, b in zip(sums["losses"], losses, strict=True)]
            sums["grad_norm"] += grad_norm

    @staticmethod
    def _loss_summary(records, kinds: list[str]) -> dict[str, float]:
        sums = {"n": len(records), "losses": [sum(col) for col in zip(*(r[1] for r in records), strict=True)],
                "grad_norm": sum(r[2] for r in records)}  # fmt: skip
        return _summary_of_sums(sums, kinds)

    def _epoch_line(self, record: dict[str, Any], steps: int) -> str:
        parts = ", ".join(f"{k[5:]} {record[k]:.3f}" for k in ("loss_min", "loss_max", "loss_random") if k in record)
        per_step = record["time_s"] / max(1, steps)
        return (
            f"epoch {record['epoch']}/{self.total_epochs}: loss {record['loss']:.4f}{f' ({parts})' if parts else ''}, "
            f"lr {record['lr']:.3g}, {steps} steps in {record['time_s']:.1f} s ({per_step:.2f} s/step)"
        )

    def _banner(self) -> str:
        o = self.opts
        params = sum(p.numel() for p in self.model.parameters())
        teacher = "none" if self.teacher is None else o.teacher or "in-place (full-precision max subnet)"
        return (
            f"qfa train: data {o.data!r} ({len(self.train_loader.dataset)} train / {len(self.val_loader.dataset)} val "
            f"images, {self.n_classes} classes), preset {getattr(o, 'preset', '?')}\n"
            f"  supernet width {o.width_mult}, {params / 1e6:.2f} M parameters, bits {list(o.bits)}, "
            f"resolutions {o.resolution_list[0]}..{o.resolution_list[-1]}\n"
            f"  {self.ctx.world_size} process(es) on {self.device}, batch {o.batch_size}/process, "
            f"{self.steps_per_epoch} steps/epoch, epochs: {o.fp_epochs} full-precision + {o.warmup_epochs} warmup + "
            f"{o.epochs}, lr {self.lr:g}, "
            f"{o.subnets} subnets/step, teacher: {teacher}, amp {o.amp}\n"
            f"  output: {self.out}"
        )

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": ckpt.FORMAT,
            "format_version": ckpt.FORMAT_VERSION,
            "model": self.model.state_dict(),
            "model_config": dict(self.model.config_kwargs),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.capture_rng(),
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "epoch_sums": self.epoch_sums,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.ctx.world_size,
            "options": self.opts.to_dict(),
            "torch_version": str(torch.__version__),
        }

    def save(self) -> None:
        """Atomically write ``OUT/last.pt`` (rank 0), after the non-finite check of every step so far."""
        self.guard.flush()
        self._drain()  # the sums saved cover every step the checkpoint has taken
        if self.ctx.is_main:
            ckpt.save_atomic(self.state_dict(), self.out / ckpt.LAST)
        distributed.barrier(self.ctx)

    def _load(self, path: Path) -> None:
        state = ckpt.load_training_state(path, map_location=self.device)
        ckpt.check_model_config(path, state["model_config"], self.model.config_kwargs)
        if state.get("steps_per_epoch") not in (None, self.steps_per_epoch):
            raise ckpt.CheckpointError(
                f"checkpoint {str(path)!r} has {state['steps_per_epoch']} steps per epoch, this run "
                f"{self.steps_per_epoch}: the data, batch size or number of processes changed"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise ckpt.CheckpointError(f"checkpoint {str(path)!r} does not fit this supernet: {err}") from err
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng(state["rng"])
        self.epoch, self.batch, self.step = int(state["epoch"]), int(state["batch"]), int(state["step"])
        self.epoch_sums = state.get("epoch_sums")
        self.info(f"resumed from {path} (epoch {self.epoch + 1}, batch {self.batch}, step {self.step})")

    def _save_supernet(self, rows: list[dict[str, Any]]) -> None:
        if not self.ctx.is_main:
            return
        run = {k: v for k, v in self.opts.to_dict().items() if k in RUN_KEYS}  # qfa eval's defaults
        extra = {"results": rows, "step": self.step, "run": run}
        path = save_trained_supernet(self.model, self.out / "supernet.pt", extra)
        self.info(f"saved the supernet to {path}")


def _summary_of_sums(sums: dict[str, Any], kinds: list[str]) -> dict[str, float]:
    """Mean losses (overall and per subnet kind) and gradient norm from running sums over ``n`` steps."""
    n, per_subnet = sums["n"], sums["losses"]
    if not n:
        return {"loss": math.nan}
    out = {"loss": sum(per_subnet) / (n * len(per_subnet))}
    for kind in ("min", "max", "random"):
        cols = [col for k, col in zip(kinds, per_subnet, strict=True) if k == kind]
        if cols:
            out[f"loss_{kind}"] = sum(cols) / (len(cols) * n)
    out["grad_norm"] = sums["grad_norm"] / n
    return out


def plan_kinds(n: int) -> list[str]:
    """Kinds of the ``n`` subnets of a step, in :func:`plan_subnets` order."""
    return ["max"] if n == 1 else ["min", "max"] + ["random"] * (n - 2)
