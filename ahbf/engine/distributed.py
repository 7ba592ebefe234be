"""Process-group set-up for ``torchrun`` (env://): NCCL on CUDA, Gloo on CPU; global rank everywhere."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but CUDA is not available; use cpu or auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


_CONTROL: dict[str, Any] = {}  # the Gloo group of the per-step control flags (CPU tensors, no GPU sync)


def setup(device_name: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE; init the process group when WORLD_SIZE > 1. A collective
    that waits more than ``timeout_s`` for another rank (hung, stopped, dead) fails instead of hanging."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=timeout_s)
        # torchrun's static rendezvous keeps one TCPStore across restarts: the dead attempt's keys (e.g. Gloo's
        # rank addresses) are still there, and a restarted rank can read them and fail ("connectFullMesh failed
        # ... Connection refused") or hang. Each attempt gets its own key prefix.
        store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        store = dist.PrefixStore(f"ahbf/attempt{generation(store, rank, world, timeout_s)}", store)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world,
                                timeout=timeout)
        _CONTROL["group"] = dist.new_group(backend="gloo", timeout=timeout) if device.type == "cuda" else None
    return DistEnv(rank, local, world, device)


class PeersLost(RuntimeError):
    """Another rank did not join this attempt in time, or a collective lost it (its process or node died): one
    line naming the missing ranks and node from the CLI, exit ``PEERS_LOST_EXIT``."""


LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Connection refused", "Broken pipe",
             "ncclRemoteError", "NCCL communicator was aborted", "collective operation timeout")


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` says a collective lost another rank (its process or node died, or hung past the timeout):
    ``PeersLost``, torch's network / store errors, or a Gloo / NCCL error saying so (plain RuntimeErrors)."""
    return isinstance(err, (PeersLost, dist.DistNetworkError, dist.DistStoreError)) or (  # the group may be gone
        isinstance(err, RuntimeError) and int(os.environ.get("WORLD_SIZE", "1")) > 1
        and any(m in str(err) for m in LOST_PEER))


def ranks_and_nodes(ranks: list[int]) -> str:
    """``node 1 (ranks 2, 3)``: nodes counted as torchrun numbers ranks, ``node_rank * nproc_per_node +
    local_rank`` (the same ``--nproc_per_node`` on every node)."""
    per_node, nodes = local_world_size(), {}
    for r in ranks:
        nodes.setdefault(r // per_node, []).append(r)
    return ", ".join(f"node {n} (rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))})"
                     for n, rs in sorted(nodes.items()))


def generation(store: dist.Store, rank: int, world: int, timeout_s: float = 600.0) -> int:
    """A number all ranks of this attempt agree on and no earlier attempt on ``store`` used. Not torchrun's
    restart count: a node's agent started again after the node died counts from 0 while the survivors' agents
    count their restarts. Rank 0 (a fresh process in every attempt) takes the next number; every other rank
    follows the newest number above the last one its rank used, says so, and goes once rank 0 has seen every
    rank say its number (a rank that read a number of an attempt that failed half-way moves on to the newer one).
    After ``timeout_s``: ``PeersLost`` naming the ranks (and nodes) that did not arrive."""
    start = time.monotonic()
    if rank == 0:
        gen = store.add("ahbf/gen", 1)
        waiting = set(range(1, world))
    else:
        last = store.add(f"ahbf/used/{rank}", 0)
    said = 0
    while True:
        if rank == 0:
            waiting = {r for r in waiting if store.add(f"ahbf/used/{r}", 0) != gen}
            if not waiting:
                store.set(f"ahbf/go/{gen}", "1")
                return gen
        else:
            newest = store.add("ahbf/gen", 0)
            if newest > last and newest != said:
                store.add(f"ahbf/used/{rank}", newest - store.add(f"ahbf/used/{rank}", 0))
                said = newest
            if said and store.check([f"ahbf/go/{said}"]):
                return said
        waited = time.monotonic() - start
        if waited > timeout_s:
            if rank == 0:
                missing = sorted(waiting)
            else:  # rank 0 has not started a new attempt, or these ranks have not said its number
                missing = [0] if not said else [r for r in range(1, world) if store.add(f"ahbf/used/{r}", 0) != said]
            raise PeersLost(f"rank {rank}: {ranks_and_nodes(missing) or 'another rank'} did not join this attempt "
                            f"within {waited:.0f} s (train.dist_timeout): its node is down, its torchrun agent died or "
                            "it was not started; each torchrun restart waits as long again")
        time.sleep(0.01)


def is_distributed() -> bool:
    """A process group of more than one rank exists."""
    return dist.is_initialized() and dist.get_world_size() > 1


def any_rank(*flags: bool) -> list[bool]:
    """Each flag OR-ed over all ranks (a Gloo all-reduce of a few CPU ints: no GPU sync); local otherwise."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [bool(f) for f in flags]
    t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
    dist.all_reduce(t, group=_CONTROL.get("group"))
    return [v > 0 for v in t.tolist()]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a small picklable value), in rank order; ``[obj]`` without a process group."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_CONTROL.get("group"))
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(group=_CONTROL.get("group"))


class LocalMainFailed(ValueError):
    """The block ``local_main_first`` runs first failed on a local rank 0: the other ranks stop too (the CLI
    prints one line per node; the failing rank prints its own error)."""


@contextlib.contextmanager
def local_main_first(env: DistEnv, enabled: bool = True) -> Iterator[None]:
    """Local rank 0 of every node runs the block first (a download), the other ranks after it has finished
    (they find the files). Every rank joins one agreement (a CPU all-reduce) that says whether the block
    failed on some local rank 0: that rank re-raises its own error, every other rank raises
    :class:`LocalMainFailed` at once instead of waiting for the process group's timeout."""
    if not (enabled and env.distributed):
        yield
        return
    if env.local_rank != 0:
        if any_rank(False)[0]:
            raise LocalMainFailed(_FIRST_FAILED)
        yield
        return
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # a peer already gone: this rank's own error is the one to report
            any_rank(True)
        raise
    if any_rank(False)[0]:  # another node's local rank 0 failed
        raise LocalMainFailed(_FIRST_FAILED)


_FIRST_FAILED = ("local rank 0 of a node failed preparing what every rank needs first (the data download: "
                 "its error is in that rank's output); stopping this rank too")


def local_world_size() -> int:
    """Processes on this node: torchrun's LOCAL_WORLD_SIZE, else 1."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: a container's or a job's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_default() -> tuple[int, str]:
    """``train.threads: 0`` (auto) -> (threads, where the number came from): ``OMP_NUM_THREADS`` when it is set
    (torch's own convention; torchrun sets it to 1 for several processes per node), else the usable cores divided
    by the processes on this node, at least 1."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    cores, procs = usable_cores(), local_world_size()
    return max(1, cores // procs), f"{cores} usable cores" + (f" / {procs} processes" if procs > 1 else "")


def default_threads() -> int:
    return thread_default()[0]


def threads_origin(threads: int) -> str:
    """Where a resolved ``train.threads`` came from, for the run header."""
    n, origin = thread_default()
    return origin if threads == n else "train.threads"


def busy_hint(threads: int) -> str:
    """One line when this machine's recent load plus this job's threads exceed its cores (threads that compete
    with other work run 10-100x slower: a 12 ms step took 1.9 s with two 2-thread jobs on 2 cores); else ''."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return ""
    cores, procs = usable_cores(), local_world_size()
    others = max(0.0, load - (procs - 1) * threads)  # this job's other processes may already count
    if others + procs * threads <= cores + 0.5:
        return ""
    n = procs * threads
    fix = "--threads 1 or an idle machine" if threads > 1 else "an idle machine or fewer processes"
    return (f"hint: this machine is busy (load average {load:.1f} on {cores} cores) and this run adds {n} "
            f"thread{'s' * (n != 1)}: CPU threads that compete run 10-100x slower; try {fix}")


def set_threads(threads: int) -> int:
    """``torch.set_num_threads``: ``threads``, or ``default_threads()`` for 0. Returns the number set."""
    n = threads or default_threads()
    torch.set_num_threads(n)
    return n


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; its gradient is the sum over ranks of the output gradients (every rank's output
    depends on this rank's input)."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm synchronised over Gloo for CPU tensors (torch's ``SyncBatchNorm`` and DDP refuse CPU): batch mean
    and (biased) variance over all ranks in two all-reduce passes that autograd differentiates, so forward and
    backward equal BatchNorm over the global batch; the running statistics are updated the same way. Any input
    of 2 or more dimensions (BatchNorm1d and 2d alike); plain BatchNorm in eval mode or without a process group."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp16 / bf16 in fp32; fp64 stays fp64
        count = torch.tensor([x.numel() // x.size(1)], dtype=xf.dtype, device=x.device)
        total = _AllReduceSum.apply(torch.cat([xf.sum(dims), count]))
        n, mean = total[-1], total[:-1] / total[-1]
        centred = xf - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1), m)
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm of ``model`` -> torch's ``SyncBatchNorm`` on CUDA, ``CpuSyncBatchNorm`` elsewhere, in place;
    same parameters (and ``requires_grad`` flags), buffers and state-dict keys."""
    for name, child in model.named_children():
        # exact types: a subclass does more (timm's BatchNormAct2d also applies its activation) and stays local
        if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            like = next(iter([*child.parameters(), *child.buffers()]), torch.empty(0))  # device and float dtype
            cls = nn.SyncBatchNorm if like.device.type == "cuda" else CpuSyncBatchNorm
            sync = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats,
                       device=like.device, dtype=like.dtype)
            sync.load_state_dict(child.state_dict())
            for new, old in zip(sync.parameters(), child.parameters()):
                new.requires_grad_(old.requires_grad)  # frozen BN (MobileNetV2's unused blocks, PCL's EMA) stays frozen
            setattr(model, name, sync.train(child.training))
        else:
            convert_sync_batchnorm(child)
    return model


def teardown() -> None:
    _CONTROL.clear()
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t: Tensor, op: str = "sum") -> Tensor:
    """In-place all-reduce (sum or min) when a process group exists; identity otherwise."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
    return t


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's BN statistics (before evaluation and saving)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for b in model.buffers():
            dist.broadcast(b, 0)
