"""Training in several processes (GPUs, machines) through engines people already run: torchrun and fastai.

``kimchi-edge train --gpus N`` re-executes itself through torchrun (``python -m torch.distributed.run
--standalone --nproc-per-node N -m kimchi_edge train ...``); there is no launcher of our own.  The same
training code runs when a user starts it with ``torchrun`` or ``accelerate launch`` directly (several
machines: torchrun's ``--nnodes`` / ``--rdzv-endpoint``): it reads ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` from the environment those launchers set.

Inside, fastai's ``Learner.distrib_ctx`` (accelerate's ``Accelerator`` + DistributedDataParallel, the data
sharded by fastai's ``DistributedDL``) trains; rank 0 alone screens the data, checks the preprocessing, runs
lr_find, evaluates, writes the reports and the run folder (atomically, as a one-process run does).  The other
ranks take part in the fit only, print nothing and write nothing.

Two CUDA assumptions of fastai 2.8.12 are worked around here; both failed 2 CPU processes (gloo) here:

* ``DistributedDL._broadcast`` (the batch order, rank 0's shuffle sent to every rank) calls
  ``LongTensor(t).cuda()`` ("nccl only works with cuda tensors"): on a CPU the first epoch stops with
  ``RuntimeError: Found no NVIDIA driver on your system``.  :func:`fastai_distributed` broadcasts a CPU
  tensor when the process group's backend is gloo (a CUDA one for NCCL, as fastai does).
* ``sync_bn=True`` (fastai's default) converts BatchNorm to ``SyncBatchNorm``: ``DistributedTrainer.before_fit``
  stops with ``ValueError: SyncBatchNorm layers only work with GPU modules``.  On a CPU it is off: each
  process normalises with its own batch statistics and DDP broadcasts rank 0's running statistics every step.

A third is not CUDA's: ``Learner.lr_find`` inside ``distrib_ctx`` saves the model in a ``TemporaryDirectory``
each rank names for itself, so only rank 0 finds its ``_tmp.pth`` and waits in ``Learner.load``'s barrier for
ranks that never come (rank 0: ``RuntimeError: Exception occured in `LRFinder` when calling event `after_fit`:
... Connection closed by peer``; rank 1 had stopped with ``IndexError: argmin(): Expected reduction dim``).
So lr_find runs on rank 0 alone, before the others join the fit.

accelerate (which fastai's ``distrib_ctx`` needs) picks its multi-CPU mode only with ``cpu=True`` (accelerate
1.15, ``PartialState._prepare_backend``); without it the model is not wrapped in DDP on a CPU.  The process group is joined here first
(``env://``), so accelerate uses it and the data can be screened once, by rank 0, before the learner exists.

fastai decides whether to gather predictions by ``WORLD_SIZE`` alone (``num_distrib()``), so the work rank 0
does by itself (screening, evaluation, reports) runs under :func:`alone`, which makes fastai see one process.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from kimchi_edge.runtime.errors import KimchiEdgeError, UsageError

T = TypeVar("T")

#: torchrun as a module of torch itself: nothing to install, the same Python as this process.
TORCHRUN = ("-m", "torch.distributed.run")


@dataclass(frozen=True)
class World:
    """Where this process stands in a distributed run (from the launcher's environment)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def world(environ: dict[str, str] | None = None) -> World:
    """The :class:`World` torchrun / accelerate launch describe in the environment (one process without them)."""
    env = os.environ if environ is None else environ

    def num(name: str, default: int) -> int:
        try:
            return int(env.get(name, default))
        except ValueError:
            raise UsageError(f"{name}={env.get(name)!r} in the environment: expected a whole number") from None

    size = num("WORLD_SIZE", 1)
    return World(rank=num("RANK", 0), size=max(1, size), local_rank=num("LOCAL_RANK", 0),
                 local_size=num("LOCAL_WORLD_SIZE", max(1, size)))


class RankZeroFailed(KimchiEdgeError):
    """Raised on ranks other than 0 when rank 0 stopped with an error (rank 0 prints it; the others stay silent)."""

    def __init__(self, exit_code: int):
        super().__init__(f"rank 0 stopped with exit code {exit_code}")
        self.exit_code = exit_code


# --------------------------------------------------------------------------- the launch: torchrun, not our own


def launch_command(train_argv: Sequence[str], nproc: int, *, python: str | None = None) -> list[str]:
    """The torchrun command that runs ``kimchi-edge train TRAIN_ARGV`` in ``nproc`` processes on this machine.

    ``--standalone``: torchrun's single-node rendezvous on a free local port (several runs at once do not
    collide).  Several machines: run torchrun yourself with ``--nnodes`` / ``--rdzv-endpoint`` (docs/TRAINING.md).
    """
    if nproc < 1:
        raise UsageError(f"--gpus {nproc}: expected 1 or more")
    return [python or sys.executable, *TORCHRUN, "--standalone", f"--nproc-per-node={nproc}",
            "-m", "kimchi_edge", "train", *train_argv]


def threads_per_process(nproc: int, threads: int | None = None) -> int:
    """CPU threads for each of ``nproc`` processes: ``threads`` if given, else the free cores shared out (at least 1)."""
    from .cpu import default_threads

    return threads or max(1, default_threads() // nproc)


def launch(train_argv: Sequence[str], nproc: int, *, threads: int, log: Callable[[str], None]) -> int:
    """Run the torchrun command of :func:`launch_command` and return its exit status.

    ``OMP_NUM_THREADS`` is set for the workers (torchrun would set 1 with a warning, accelerate the physical
    cores divided by the processes, both ignoring what else runs on the machine).
    """
    cmd = launch_command(train_argv, nproc)
    log(f"launching {nproc} processes through torchrun ({threads} CPU thread{'s' * (threads > 1)} each): "
        + " ".join(shlex.quote(c) for c in cmd))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.run(cmd, env=env, check=False).returncode


# --------------------------------------------------------------------------- inside a worker


def init_process_group(w: World, cuda: bool) -> str | None:
    """Join the launcher's process group (``env://``): NCCL on CUDA (one GPU per local rank), gloo on a CPU.

    Returns:
        The backend, or None for a one-process run (nothing to join).
    """
    if not w.distributed:
        return None
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_backend()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        if w.local_rank >= torch.cuda.device_count():
            raise UsageError(f"local rank {w.local_rank} but torch sees {torch.cuda.device_count()} CUDA GPU(s); "
                             "start at most one process per GPU")
        torch.cuda.set_device(w.local_rank)
    dist.init_process_group(backend=backend, init_method="env://")
    return backend


def share_from_rank0(w: World, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 alone (as one process, :func:`alone`) and give its result to every rank.

    A :class:`KimchiEdgeError` on rank 0 is raised there as it is; the other ranks get :class:`RankZeroFailed`
    with its exit code, so one line is printed, not one per process.
    """
    if not w.distributed:
        return fn()
    import torch.distributed as dist

    box: list[Any] = [None]
    error: KimchiEdgeError | None = None
    if w.is_rank0:
        try:
            with alone():
                box[0] = ("ok", fn())
        except KimchiEdgeError as exc:
            error = exc
            box[0] = ("error", exc.exit_code)
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise RankZeroFailed(value)
    return value


def barrier(w: World) -> None:
    """Wait for every rank (nothing in a one-process run)."""
    if w.distributed:
        import torch.distributed as dist

        dist.barrier()


def leave(w: World) -> None:
    """Wait for every rank, then leave the process group: from here rank 0 works alone."""
    if not w.distributed:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """fastai sees one process (``WORLD_SIZE=1``, ``RANK=0``) inside: no gathering, no barriers, rank-0 writes.

    fastai's ``num_distrib()`` / ``rank_distrib()`` read only these variables, so without this a ``validate``
    on rank 0 alone would wait forever in an ``all_gather`` the other ranks never join.
    """
    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK")}
    os.environ["WORLD_SIZE"], os.environ["RANK"] = "1", "0"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _broadcast_on_backend_device(self, t, rank):
    """``DistributedDL._broadcast`` that keeps the tensor on the CPU for gloo (fastai's always calls ``.cuda()``)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(t, dtype=torch.long)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, rank)
    return t.cpu().tolist()


@contextlib.contextmanager
def fastai_distributed(learn, w: World, cuda: bool) -> Iterator[Any]:
    """``learn.distrib_ctx()`` (fastai + accelerate) for this world; nothing changes in a one-process run.

    On a CPU: accelerate's ``cpu=True`` (its multi-CPU mode, gloo), no SyncBatchNorm, and fastai's batch-order
    broadcast on a CPU tensor (see the module docstring for the errors these avoid).
    """
    if not w.distributed:
        yield learn
        return
    from kimchi_edge.runtime.errors import require

    require("accelerate", extra="train", purpose="training in several processes (fastai's distrib_ctx)")
    from fastai.distributed import DistributedDL

    original = DistributedDL._broadcast
    DistributedDL._broadcast = _broadcast_on_backend_device
    try:
        with learn.distrib_ctx(sync_bn=cuda, cpu=not cuda):
            yield learn
    finally:
        DistributedDL._broadcast = original
