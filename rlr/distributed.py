"""Training on several devices or machines: torch.distributed + DistributedDataParallel via torchrun.

``torchrun --nproc_per_node N -m rlr train ...`` starts N processes (ranks); each one finds
WORLD_SIZE / RANK / LOCAL_RANK in its environment and :func:`session` joins them into one
process group: NCCL with rank r on ``cuda:LOCAL_RANK``, gloo on CPU. Without torchrun (or with
WORLD_SIZE=1) :func:`session` gives a one-rank context whose every method is the single-process
behaviour, so ``rlr train`` then runs exactly as before.

What a rank does under torchrun (docs/distributed.md):

- data: the training images, in the data set's fixed order, are dealt out by index modulo the
  world size (:func:`shard_indices`); a rank computes, caches and keeps in memory the features of
  its own shard only.
- epoch: every rank runs ``ceil(ceil(N / W) / batch)`` steps: a shard one image short is padded
  with its own first images of the epoch's order. The order is a permutation of the shard seeded
  by (seed, epoch, rank), and so is the jitter noise: resuming at epoch e gives the same batches
  and noise as an uninterrupted run, with no per-rank RNG state in the checkpoint.
- step: DDP averages the gradients of the summed loss over ranks (the reference too, like any
  parameter); the global batch is per-rank batch x world size; the learning rate is NOT scaled.
- rank 0 alone writes config, checkpoints (atomically), logs and progress bars.

Failures. Until training starts ("setup": reading the run, the data set, the backbone, the
features) every collective is an exchange of ``(failure, value)`` between all ranks, and a rank
that fails sends its failure in the next one: all ranks then stop together, the failure is
printed once by the rank it happened on, and no rank waits for a peer that is gone. During
training a rank that dies or stalls makes the others' gradient all-reduce fail (gloo: at once,
or after the process-group timeout); that becomes a :class:`DistributedError` that names the
rank and says to restart with ``--resume``. (With NCCL, PyTorch's watchdog ends a rank whose
collective outlives the timeout itself, with its own message.)
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .run import CHECKPOINT_FILE, RunError

DEFAULT_TIMEOUT_MINUTES = 30.0   # a collective waiting longer than this for a peer fails

_DDP_PARAMETERS = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters

# Streams of the per-(seed, epoch, rank) seeds: the epoch's order and the epoch's jitter noise.
_SHUFFLE_STREAM, _NOISE_STREAM = 1, 2


class DistributedError(RunError):
    """A rank lost contact with the others (a peer died, or stalled past the timeout)."""


class PeerFailure(RunError):
    """Raised on every rank when another rank failed during setup; that rank reports the failure."""

    rlr_quiet = True   # the command line prints nothing for it: the failing rank already did


def world_from_environment() -> tuple:
    """(rank, local_rank, world_size) that torchrun set; (0, 0, 1) in a plain process."""
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        return 0, 0, 1
    try:
        world = int(world)
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise RunError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is set but RANK/LOCAL_RANK are missing or not "
                       f"integers: start several processes with torchrun, which sets all three") from None
    if world < 1 or not 0 <= rank < world:
        raise RunError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, local_rank, world


def rank_label() -> str:
    """'rank R/W: ' under torchrun with several ranks, else '' (prefix of error messages)."""
    rank, _, world = world_from_environment()
    return f"rank {rank}/{world}: " if world > 1 else ""


def is_main_process() -> bool:
    """False on the ranks of a torchrun job other than rank 0 (they print nothing)."""
    return world_from_environment()[0] == 0


def require_single_process(command: str) -> None:
    """Refuse a command that does not run distributed (everything but ``train``) under torchrun."""
    rank, _, world = world_from_environment()
    if world > 1:
        err = RunError(f"`rlr {command}` is a single-process command and runs on one device; it was started as "
                       f"{world} ranks by torchrun. Run it without torchrun: rlr {command} ...")
        err.rlr_quiet = rank != 0   # the same message from every rank: rank 0 prints it
        raise err


def shard_indices(count: int, rank: int, world_size: int) -> list:
    """Indices of the items of ``rank``: rank, rank + W, rank + 2W, ... (disjoint, covering 0..count-1)."""
    return list(range(rank, count, world_size))


def samples_per_rank(count: int, world_size: int) -> int:
    """Samples every rank processes per epoch: the largest shard, ceil(count / world_size)."""
    return math.ceil(count / world_size)


def epoch_seed(seed: int, stream: int, epoch: int, rank: int) -> int:
    """A well-mixed 63-bit seed for one (seed, stream, epoch, rank)."""
    state = np.random.SeedSequence([seed % 2 ** 64, stream, epoch, rank]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def class_quotas(sizes: list, length: int, balance: float) -> list:
    """How many of ``length`` draws each class gets: in proportion to size ** (1 - balance).

    balance 1: every class equally often; 0.5: in proportion to the square root of its image
    count; 0: in proportion to its image count. Largest remainder; ties go to the earlier class.
    """
    weights = [size ** (1.0 - balance) for size in sizes]
    ideal = [length * weight / sum(weights) for weight in weights]
    quotas = [math.floor(share + 1e-9) for share in ideal]   # 1e-9: 660 * (1/3) must give 220, not 219
    by_remainder = sorted(range(len(sizes)), key=lambda c: (-(ideal[c] - quotas[c]), c))
    for c in by_remainder[:length - sum(quotas)]:
        quotas[c] += 1
    return quotas


def class_balanced_order(classes: torch.Tensor, length: int, generator: torch.Generator,
                         balance: float = 1.0) -> torch.Tensor:
    """``length`` indices into ``classes`` (one class id per item), each class drawn ``class_quotas``
    times (``balance`` 1: every class equally often).

    A class's draws are fresh permutations of its items, concatenated as often as needed, so a
    small class repeats its images within the epoch and a large one is subsampled. The result is
    shuffled.
    """
    names = torch.unique(classes)
    members = [torch.nonzero(classes == name).flatten() for name in names.tolist()]
    parts = []
    for items, quota in zip(members, class_quotas([len(m) for m in members], length, balance)):
        passes = -(-quota // len(items))
        picks = [items[torch.randperm(len(items), generator=generator)] for _ in range(passes)]
        parts.append(torch.cat(picks)[:quota])
    order = torch.cat(parts)
    return order[torch.randperm(len(order), generator=generator)]


def shard_order(shard_size: int, length: int, seed: int, epoch: int, rank: int,
                classes: Optional[torch.Tensor] = None, balance: float = 1.0) -> torch.Tensor:
    """One epoch of a rank: a seeded permutation of its ``shard_size`` items, padded to ``length``
    by repeating its first items (a shard is at most one item shorter than the longest).
    With ``classes`` (class id of each shard item), a class-balanced order of that length instead."""
    if shard_size < 1:
        raise ValueError(f"rank {rank} has no training image: fewer images than ranks")
    generator = torch.Generator().manual_seed(epoch_seed(seed, _SHUFFLE_STREAM, epoch, rank))
    if classes is not None:
        return class_balanced_order(classes, length, generator, balance)
    order = torch.randperm(shard_size, generator=generator)
    return order.repeat(math.ceil(length / shard_size))[:length]


def _is_communication_failure(err: BaseException) -> bool:
    """A failed collective: torch's DistError, or a backend RuntimeError (gloo raises plain ones)."""
    if isinstance(err, torch.distributed.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(marker in text for marker in (
        "gloo", "NCCL", "nccl", "Connection reset", "Connection closed", "Connection refused", "Broken pipe",
        "Timed out", "timed out", "ProcessGroup"))


def _resolve_device(requested: Optional[str], rank: int, local_rank: int, world: int) -> torch.device:
    """cuda:LOCAL_RANK (default when CUDA is available, or ``--device cuda``), else cpu."""
    def refuse(message):
        err = ValueError(message)
        err.rlr_quiet = rank != 0   # every rank finds the same problem: rank 0 reports it
        raise err

    kind = torch.device(requested).type if requested else ("cuda" if torch.cuda.is_available() else "cpu")
    if requested and torch.device(requested).index is not None:
        refuse(f"--device {requested}: under torchrun rank r runs on cuda:LOCAL_RANK; pass --device cuda (or cpu), "
               f"and choose the GPUs with CUDA_VISIBLE_DEVICES")
    if kind == "cpu":
        return torch.device("cpu")
    if kind != "cuda":
        refuse(f"--device {requested}: distributed training runs on cuda (NCCL) or cpu (gloo)")
    if not torch.cuda.is_available():
        refuse(f"--device {requested} requested but CUDA is not available; use --device cpu")
    visible = torch.cuda.device_count()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    if max(local_world, local_rank + 1) > visible:
        refuse(f"{local_world} ranks on this machine (torchrun --nproc_per_node) but only {visible} CUDA device(s) "
               f"visible: one rank per GPU; lower --nproc_per_node to {visible}")
    return torch.device("cuda", local_rank)


class Distributed:
    """Where this process stands in the job, and the few collective steps that training needs.

    With ``world_size == 1`` every method is the single-process behaviour and nothing is
    communicated. Build it with :func:`session`.
    """

    def __init__(self, rank: int, local_rank: int, world_size: int, device: torch.device,
                 backend: Optional[str] = None, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES):
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.device, self.backend, self.timeout_minutes = device, backend, timeout_minutes
        self.in_setup = world_size > 1     # until end_setup(): failures are agreed upon (see module doc)
        self.owns_group = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ data

    def shard(self, items: Sequence) -> list:
        """This rank's items (all of them in a single process)."""
        if self.active and len(items) < self.world_size:
            raise ValueError(f"{len(items)} training images cannot be shared by {self.world_size} ranks: "
                             f"use at most {len(items)} processes")
        return [items[i] for i in shard_indices(len(items), self.rank, self.world_size)]

    def samples_per_rank(self, count: int) -> int:
        return samples_per_rank(count, self.world_size)

    def epoch_order(self, epoch: int, shard_size: int, count: int, shuffle: torch.Generator,
                    noise: torch.Generator, seed: int, classes: Optional[torch.Tensor] = None,
                    balance: float = 1.0) -> torch.Tensor:
        """This rank's sample order for ``epoch`` (indices into its shard).

        Single process: ``randperm(count)`` from the persistent ``shuffle`` generator, as always.
        Distributed: a permutation seeded by (seed, epoch, rank), padded to the longest shard,
        and ``noise`` reseeded the same way, so every epoch is reproducible on its own.
        ``classes`` (the class id of each shard item): a class-balanced order of the same length
        (``class_balanced_order`` with ``balance``) instead of a permutation.
        """
        if not self.active:
            if classes is not None:
                return class_balanced_order(classes, count, shuffle, balance)
            return torch.randperm(count, generator=shuffle)
        noise.manual_seed(epoch_seed(seed, _NOISE_STREAM, epoch, self.rank))
        return shard_order(shard_size, self.samples_per_rank(count), seed, epoch, self.rank, classes, balance)

    # ------------------------------------------------------------------ setup collectives

    def _exchange(self, value=None, failure: Optional[BaseException] = None) -> list:
        """All-gather ``(failure, value)``; if any rank failed, raise on every rank (see module doc)."""
        message = None if failure is None else f"{type(failure).__name__}: {failure}"
        entries = [None] * self.world_size
        torch.distributed.all_gather_object(entries, (message, value))
        failed = [r for r, (m, _) in enumerate(entries) if m is not None]
        if not failed:
            return [v for _, v in entries]
        self.in_setup = False
        first = failed[0]
        if failure is not None:
            if first != self.rank:
                failure.rlr_quiet = True    # another rank reports first; this one stays quiet
            raise failure
        raise PeerFailure(f"rank {first} failed during setup: {entries[first][0]}")

    def gather(self, items: Sequence) -> list:
        """The concatenation of every rank's ``items``, in rank order (``items`` in a single process)."""
        if not self.active:
            return list(items)
        return [item for part in self._exchange(list(items)) for item in part]

    def from_main(self, fn: Callable, *args):
        """``fn(*args)`` computed on rank 0 and handed to every rank (a run folder need not be shared)."""
        if not self.active:
            return fn(*args)
        value, failure = None, None
        if self.is_main:
            try:
                value = fn(*args)
            except Exception as err:   # noqa: BLE001 - handed to every rank by _exchange
                failure = err
        self._exchange(failure=failure)
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def end_setup(self) -> None:
        """The last agreed step: after it, a failure on one rank ends the job through torchrun/the timeout."""
        if self.active:
            self._exchange()
            self.in_setup = False

    # ------------------------------------------------------------------ training

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around ``model`` (call after loading its state: DDP starts from rank 0's weights)."""
        if not self.active:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # The only buffers are constant position tables: nothing to sync before each forward.
        sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_PARAMETERS
                else {"broadcast_buffers": False})
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True, **sync)

    def sum(self, *values: float) -> tuple:
        """Sums over ranks of a few numbers (the numbers themselves in a single process)."""
        if not self.active:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total)
        return tuple(total.tolist())

    def describe(self, batch_size: int, lr: float, count: int) -> str:
        """The log line about the job (empty in a single process)."""
        if not self.active:
            return ""
        return (f"distributed: {self.world_size} ranks ({self.backend}, {self.device.type}), "
                f"{self.samples_per_rank(count)} images per rank per epoch | batch {batch_size} per rank = "
                f"global batch {batch_size * self.world_size} | lr {lr} as given (not scaled with the global batch)")

    def checkpoint_info(self, batch_size: int) -> dict:
        """What the checkpoint records about the job (nothing in a single process)."""
        if not self.active:
            return {}
        return {"distributed": {"world_size": self.world_size, "backend": self.backend,
                                "global_batch": batch_size * self.world_size}}

    def check_resume(self, checkpoint: dict, batch_size: int, log: Callable) -> None:
        """Say so when a run continues with another number of ranks (another global batch and order)."""
        before = checkpoint.get("distributed", {}).get("world_size", 1)
        if before != self.world_size:
            log(f"note: this run trained with {before} rank(s) (global batch {batch_size * before}) and continues with "
                f"{self.world_size} (global batch {batch_size * self.world_size}): the data order and the effective "
                f"batch change from here on")

    # ------------------------------------------------------------------ failures

    def settle(self, err: Exception, run_dir: Optional[Path]) -> None:
        """Re-raise ``err`` as every rank should see it (see module doc)."""
        if not self.active or isinstance(err, (PeerFailure, DistributedError)):
            raise err
        if _is_communication_failure(err):
            self.in_setup = False
            where = f"{run_dir / CHECKPOINT_FILE}" if run_dir is not None else "the run's checkpoint"
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DistributedError(
                f"lost contact with the other ranks: a rank died or stalled for more than the {self.timeout_minutes:g} "
                f"min timeout (--dist-timeout). Restart the same torchrun command with --resume to continue from the "
                f"last complete epoch in {where} (without --resume if no epoch had completed). "
                f"[{type(err).__name__}: {first_line}]") from err
        if self.in_setup:
            self._exchange(failure=err)   # raises err here, PeerFailure on the other ranks
        raise err

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            # Every rank arrives before any tears down: a gloo rank whose peer had already closed
            # its connections was seen to abort at exit ("terminate called without an active exception").
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        self.owns_group = False


def _initialise(device: Optional[str], timeout_minutes: float) -> Distributed:
    rank, local_rank, world = world_from_environment()
    if world == 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        from .inference import resolve_device

        return Distributed(0, 0, 1, resolve_device(device), timeout_minutes=timeout_minutes)
    if not (timeout_minutes > 0 and math.isfinite(timeout_minutes)):
        raise ValueError(f"--dist-timeout must be a positive number of minutes, got {timeout_minutes!r}")
    resolved = _resolve_device(device, rank, local_rank, world)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    context = Distributed(rank, local_rank, world, resolved, backend, timeout_minutes)
    if torch.distributed.is_initialized():   # the caller's own process group: use it, leave it to them
        context.rank, context.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        context.backend = torch.distributed.get_backend()
        context.in_setup = context.world_size > 1
        return context
    kwargs = {"device_id": resolved} if resolved.type == "cuda" else {}
    try:
        torch.distributed.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes), **kwargs)
    except Exception as err:   # noqa: BLE001 - rendezvous and network errors of every kind
        raise DistributedError(f"cannot join the torchrun job as rank {rank}/{world} ({backend}): {err}") from None
    context.owns_group = True
    return context


@contextlib.contextmanager
def session(device: Optional[str] = None, timeout_minutes: Optional[float] = None,
            run_dir=None) -> Iterator[Distributed]:
    """The job this process belongs to (see module doc); a plain process is a job of one rank.

    Ranks other than 0 run with warnings silenced; failures are re-raised as described above.
    """
    timeout = DEFAULT_TIMEOUT_MINUTES if timeout_minutes is None else float(timeout_minutes)
    context = _initialise(device, timeout)
    with warnings.catch_warnings() if not context.is_main else contextlib.nullcontext():
        if not context.is_main:
            warnings.simplefilter("ignore")
        try:
            yield context
        except Exception as err:
            if os.environ.get("RLR_DEBUG") and context.active:
                traceback.print_exc()
            # No destroy_process_group here: peers may be gone or being killed by torchrun, and tearing the
            # group down under them can block (NCCL) or abort (gloo). The failing process exits anyway.
            context.settle(err, Path(run_dir) if run_dir is not None else None)
        context.close()
