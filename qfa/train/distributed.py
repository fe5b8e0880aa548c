"""Data parallelism: :class:`~torch.nn.parallel.DistributedDataParallel` with one gradient sync per step.

Every step trains several different subnets on the same batch, each using a different subset of the
supernet's parameters (and of its per-bit-width quantizers); their gradients are summed. All ranks
train the *same* subnets (sampled from a seeded ``random.Random``), so all ranks use the same
parameters. The trainer runs the forward and backward of every subnet but the last under
:meth:`~torch.nn.parallel.DistributedDataParallel.no_sync` (gradients accumulate locally) and lets
DDP all-reduce during the last backward (:func:`sync_unless`).

``find_unused_parameters=True`` is required and sufficient: the last subnet uses only part of the
supernet, so without it DDP waits for gradients that never come (an error at the next step). With
it, DDP marks the parameters outside the last subnet's graph as ready; those that accumulated a
gradient under ``no_sync`` (its reducer records them as locally used) are all-reduced with the
rest, so the union of the step's parameters is synchronised; parameters no subnet used keep no
gradient. ``tests/qfa/test_train_distributed.py`` checks this against one process on the concatenated
batch. ``static_graph`` would be wrong (the graph changes every step). Only the synced forward walks
the autograd graph, once per step.

Buffers are not re-broadcast at every forward: :func:`broadcast_module` makes every rank start from
rank 0's state, and a training forward writes no running statistics (only recalibration does); the
only buffers it sets are the LSQ ``initialized`` flags, identically on every rank (each step is
initialised from the weights, which are the same everywhere). :func:`wrap_ddp` passes DDP the
argument for that in the form the running torch asks for, and makes the gradients of channels_last
weights with a size-1 dimension arrive in their parameter's strides (:func:`match_grad_strides`),
so DDP warns about neither.

The step's loss values are averaged separately (:func:`all_reduce_mean`, one small all-reduce),
so every rank sees the global mean losses and all ranks stop together on a non-finite loss; each
rank's Ctrl-C flag rides in the same all-reduce, so all ranks stop at the same step on Ctrl-C too.

Multi-node runs (``torchrun --nnodes``) need nothing more: ranks are global, every loader shards by
global rank, and rank 0 alone writes. A rank that dies makes the others' next collective fail
(gloo: at once; NCCL: after the process group's timeout); :func:`describe_peer_failure` turns that
into one clear line. See ``docs/distributed.md``.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

BUCKET_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class DistContext:
    """Where this process runs: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; or the named device."""
    if device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dev = parse_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def parse_device(name: str) -> torch.device:
    """``torch.device(name)``, checked to be usable here: a ValueError naming ``--device`` instead of
    torch's error from deep inside the first tensor move."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device {name!r}: not a device name ({err})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name!r}: CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name!r}: MPS is not available")
    return dev


def setup(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); a single process when there is none.

    NCCL on CUDA devices, gloo on the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _buckets(tensors: list[Tensor], bucket_bytes: int) -> list[list[Tensor]]:
    """Consecutive groups of same-dtype tensors of about ``bucket_bytes`` each (order preserved)."""
    by_dtype: dict[torch.dtype, list[list[Tensor]]] = {}
    sizes: dict[torch.dtype, int] = {}
    for t in tensors:
        groups = by_dtype.setdefault(t.dtype, [[]])
        nbytes = t.numel() * t.element_size()
        if groups[-1] and sizes[t.dtype] + nbytes > bucket_bytes:
            groups.append([])
            sizes[t.dtype] = 0
        groups[-1].append(t)
        sizes[t.dtype] = sizes.get(t.dtype, 0) + nbytes
    return [g for groups in by_dtype.values() for g in groups]


@torch.no_grad()
def all_reduce_mean(tensors: list[Tensor], world_size: int, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Average ``tensors`` in place across ranks: flattened into buckets, all-reduced asynchronously."""
    if world_size == 1 or not tensors:
        return
    pending = []
    for bucket in _buckets(tensors, bucket_bytes):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        pending.append((bucket, flat, dist.all_reduce(flat, async_op=True)))
    for bucket, flat, work in pending:
        work.wait()
        flat.div_(world_size)
        for t, chunk in zip(bucket, flat.split([t.numel() for t in bucket]), strict=True):
            t.copy_(chunk.view_as(t))


def wrap_ddp(module: nn.Module, ctx: DistContext) -> nn.Module:
    """``module`` in :class:`~torch.nn.parallel.DistributedDataParallel` when ``ctx`` is distributed
    (``find_unused_parameters=True``, see the module doc), else ``module`` itself.

    Call it after :func:`broadcast_module`; keep using ``module`` for everything but the training
    forward (state dicts, validation, the in-place teacher).
    """
    if not ctx.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    kwargs: dict = {"find_unused_parameters": True, **no_forward_buffer_sync(DistributedDataParallel)}
    if ctx.device.type == "cuda":
        kwargs.update(device_ids=[ctx.device.index], output_device=ctx.device.index)
    match_grad_strides(module)
    return DistributedDataParallel(module, **kwargs)


def no_forward_buffer_sync(ddp: type) -> dict[str, bool]:
    """The argument of ``ddp`` (DistributedDataParallel) for "no buffer broadcast at every forward":
    ``forward_sync_buffers=False`` where this torch has it (``broadcast_buffers`` is deprecated there,
    with a FutureWarning), else ``broadcast_buffers=False`` (torch <= 2.11). Either way the buffers
    equal rank 0's before DDP is built (:func:`broadcast_module`), so whether DDP also syncs them at
    construction does not matter."""
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def match_grad_strides(module: nn.Module) -> None:
    """Make the gradients of ``module``'s parameters arrive with exactly their parameter's strides.

    DDP's gradient buckets are views with each parameter's strides and it warns ("Grad strides do not
    match bucket view strides") when a gradient's differ. A parameter with a size-1 dimension has two
    valid stride sets for one memory layout: in channels_last a ``[C, 1, k, k]`` depthwise or
    ``[O, I, 1, 1]`` pointwise weight has strides ``[k*k, 1, k, 1]`` / ``[I, 1, I, I]``, the same bytes
    as the contiguous ``[k*k, k*k, k, 1]`` / ``[I, 1, 1, 1]`` that the weight slicing's backward
    produces, and autograd keeps such a gradient as it is (its layout contract ignores size-1
    dimensions). A hook on those parameters only relabels the strides of the size-1 dimensions
    (``as_strided``: no copy); any other layout difference is left to autograd, which copies into the
    parameter's layout itself.
    """
    for p in module.parameters():
        if p.requires_grad and 1 in p.shape and p.dim() > 1:
            p.register_hook(_restride_hook(p.shape, p.stride()))


def _restride_hook(shape: torch.Size, stride: tuple[int, ...]) -> Callable[[Tensor], Tensor]:
    def restride(grad: Tensor) -> Tensor:
        if grad.stride() == stride or grad.shape != shape:
            return grad
        if all(n == 1 or a == b for n, a, b in zip(shape, grad.stride(), stride, strict=True)):
            return grad.as_strided(shape, stride, grad.storage_offset())
        return grad

    return restride


def sync_unless(net: nn.Module, accumulate: bool) -> contextlib.AbstractContextManager:
    """The context for one subnet's forward and backward: ``net.no_sync()`` when ``accumulate`` and
    ``net`` is DDP (gradients stay local), else nothing (DDP all-reduces during the backward)."""
    from torch.nn.parallel import DistributedDataParallel

    if accumulate and isinstance(net, DistributedDataParallel):
        return net.no_sync()
    return contextlib.nullcontext()


@torch.no_grad()
def broadcast_module(module: nn.Module, ctx: DistContext, src: int = 0) -> None:
    """Make every rank's state dict equal to rank ``src``'s (bucketed broadcasts), then reload it so
    that modules with load hooks (e.g. the LSQ ``initialized`` host flag) see the new values."""
    if not ctx.distributed:
        return
    state = module.state_dict()
    tensors = [t for t in state.values() if isinstance(t, Tensor) and t.numel() > 0]
    for bucket in _buckets(tensors, BUCKET_BYTES):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        wire = flat.to(torch.uint8) if flat.dtype == torch.bool else flat  # gloo/NCCL have no bool
        dist.broadcast(wire, src)
        flat = wire.to(flat.dtype)
        for t, chunk in zip(bucket, flat.split([t.numel() for t in bucket]), strict=True):
            t.copy_(chunk.view_as(t))
    module.load_state_dict(state)


def all_reduce_sum(t: Tensor, ctx: DistContext) -> Tensor:
    """Sum of ``t`` over ranks (in place); ``t`` itself when not distributed."""
    if ctx.distributed:
        dist.all_reduce(t)
    return t


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def gather_object(obj: object, ctx: DistContext) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` when not distributed."""
    if not ctx.distributed:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


# How a collective or the rendezvous store reports that another process of the run is gone: gloo's
# socket errors (plain RuntimeErrors, told apart by their text), NCCL's remote-error text, the store's
# DistNetworkError. Other collective errors (mismatched shapes: a bug) keep their traceback.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited")


def describe_peer_failure(err: BaseException, ctx: DistContext) -> str | None:
    """A one-line explanation when ``err`` is a collective that failed because another rank stopped
    (crashed, was killed, lost its node); ``None`` for any other error (a real bug keeps its traceback)."""
    if not ctx.distributed or not isinstance(err, RuntimeError):
        return None
    text = str(err)
    if not (isinstance(err, dist.DistNetworkError) or any(marker in text for marker in _PEER_LOST)):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    return (
        f"rank {ctx.rank} of {ctx.world_size}: another process of the run stopped (it crashed, was killed or "
        f"lost its node; its own log has the cause), so this one stops too ({type(err).__name__}: {first})"
    )
