"""Two torchrun agents on this box as two "nodes" (static rendezvous, 1 Gloo process each), through the real CLI.

1. 2 nodes x batch 8 with SyncBN train the weights of 1 process x batch 16 (in float64, as
   ``test_engine_ddp_exact.py``).
2. Node 1 dies (SIGKILL to its agent and its worker) after the first checkpoint. Node 0's worker fails at its
   next collective; its agent restarts it and waits in the rendezvous for node 1. Node 1's agent is started
   again with the same command (what a requeued job or an operator does); the group re-forms, resumes from the
   newest checkpoint (``--resume auto``) and finishes every step.
3. Node 1's agent alone is SIGKILLed: its worker ends within seconds, saying why; node 0's worker loses it, and
   its restart names the node that did not join and how long it waited (one line each, no worker traceback).
What torchrun 2.14 does here, found by experiment: a fixed ``--nnodes 2`` job never finishes without the dead
node (the survivor waits). The re-started agent's worker counts restarts from 0, the survivor's from 1: with
the restart count as the store's key prefix its first attempt read the dead attempt's Gloo addresses (failed,
or hung), and the trainer's restart check ran a collective on one rank only (hung). Both are fixed
(``distributed.generation``, an agreed restart check); the test asserts that the first attempt works.
docs/training.md "A node dies".
"""
from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from ahbf.engine.checkpoint import load_checkpoint
from test_engine_ddp import free_port
from test_engine_ddp_exact import COMMON, FP64_BOUND, assert_same_run, single  # noqa: F401 (single: 1 x 16)
from test_engine_fault import _state

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# 2 ranks x batch 8 on 58 images: 4 steps per epoch; 6 epochs = 24 steps, a checkpoint every 2
LONG = ["--dataset", "synthetic", "data.synthetic_samples=64", "--image-size", "8", "--arch", "resnet8",
        "--num-branches", "2", "-b", "8", "--epochs", "6", "--precision", "fp32", "--objective-backend", "eager",
        "--deterministic", "--no-progress", "train.tensorboard=false", "--threads", "1", "--log-interval", "1",
        "--device", "cpu", "--checkpoint-every", "2", "--resume", "auto"]


class Node:
    """One torchrun agent (its own session), its output read by a thread into ``lines``."""

    def __init__(self, rank: int, port: int, args: list[str], restarts: int = 0):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
               "--max-restarts", str(restarts), "--monitor_interval", "0.2", "-m", "ahbf.engine.cli", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        """The node dies: SIGKILL to the agent and every process under it (torchrun starts its workers in their
        own sessions, so the agent's process group alone would leave the worker running)."""
        for pid in [self.proc.pid, *_descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(c) for t in os.listdir(f"/proc/{p}/task")
                    for c in open(f"/proc/{p}/task/{t}/children").read().split()]
        except OSError:
            kids = []
        found += kids
        todo += kids
    return found


def start_nodes(args: list[str], restarts: int = 0) -> tuple[list[Node], int]:
    """Node 0 first (its agent hosts the rendezvous store), then node 1 once the store listens."""
    port = free_port()
    nodes = [Node(0, port, args, restarts)]
    deadline = time.time() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert nodes[0].proc.poll() is None and time.time() < deadline, nodes[0].text[-3000:]
            time.sleep(0.1)
    nodes.append(Node(1, port, args, restarts))
    return nodes, port


def wait_for(nodes: list[Node], text: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not any(text in n.text for n in nodes):
        assert time.time() < deadline and all(n.proc.poll() is None for n in nodes), \
            f"no {text!r}:\n" + "\n".join(n.text[-2000:] for n in nodes)
        time.sleep(0.05)


def kill_all(nodes: list[Node]) -> None:
    for n in nodes:
        if n.proc.poll() is None or _descendants(n.proc.pid):
            n.kill()


@pytest.mark.isa
def test_two_nodes_with_sync_bn_equal_one_process(single, tmp_path):  # noqa: F811
    nodes, _ = start_nodes([*COMMON, "-b", "8", "--sync-bn", "-o", str(tmp_path)])
    try:
        codes = [n.wait(timeout=300) for n in nodes]
    finally:
        kill_all(nodes)
    assert codes == [0, 0], "\n".join(n.text[-3000:] for n in nodes)
    assert "world size 2" in nodes[0].text and nodes[1].text.count("TARGET (branch0) TEST TOP-1") == 0
    with open(tmp_path / "metrics.csv") as f:
        losses = [float(row["train_loss"]) for row in csv.DictReader(f)]
    assert_same_run((load_checkpoint(str(tmp_path / "last.pt"))["model"], losses), single, FP64_BOUND)


def test_a_killed_node_restarted_resumes_from_the_last_checkpoint(tmp_path):
    nodes, port = start_nodes([*LONG, "-o", str(tmp_path)], restarts=2)
    try:
        wait_for(nodes, "(5)  loss")  # the checkpoint of step 4 (and the epoch end) exists
        nodes[1].kill()
        before = load_checkpoint(str(tmp_path / "last.pt"))["step"]
        assert before >= 4
        nodes.append(Node(1, port, [*LONG, "-o", str(tmp_path)], restarts=2))  # the node comes back
        codes = [nodes[0].wait(timeout=300), nodes[2].wait(timeout=120)]
    finally:
        kill_all(nodes)
    out = "\n".join(n.text[-4000:] for n in nodes)
    assert codes == [0, 0], out
    assert "failed (exitcode" not in nodes[2].text, out  # the re-started node's first attempt works
    resumed = [line for n in nodes for line in n.lines if "resumed from" in line]
    assert resumed, out
    steps = int(resumed[-1].split("(")[-1].split(" steps")[0])
    assert steps >= before, (steps, before)
    ckpt = load_checkpoint(str(tmp_path / "last.pt"))
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (6, 0, 24)
    assert [row["epoch"] for row in ckpt["history"]] == [1, 2, 3, 4, 5, 6]
    assert [row["step"] for row in ckpt["history"]] == [4, 8, 12, 16, 20, 24]
    with open(tmp_path / "metrics.csv") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "results.json").exists()


def _attempt(store, ranks: list[int], world: int, timeout_s: float = 20.0) -> dict[int, object]:
    """``generation`` on threads as ranks ``ranks`` of one attempt: {rank: number or the exception}."""
    from ahbf.engine.distributed import generation

    out: dict[int, object] = {}

    def one(r):
        try:
            out[r] = generation(store, r, world, timeout_s)
        except RuntimeError as err:
            out[r] = err

    threads = [threading.Thread(target=one, args=(r,)) for r in reversed(ranks)]  # non-zero ranks first
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def test_every_attempt_on_one_store_gets_one_new_number():
    """One store across attempts (the static rendezvous): a whole-group restart, a node started again (its rank
    counts from scratch), and an attempt that failed half-way (rank 2 never came) all end with every rank on
    the same number, never one an earlier attempt used."""
    import torch.distributed as dist

    store, world, seen = dist.HashStore(), 3, []
    for ranks, timeout_s in [([0, 1, 2], 20.0), ([0, 1, 2], 20.0), ([0, 1], 1.0), ([0, 1, 2], 20.0)]:
        got = _attempt(store, ranks, world, timeout_s)
        if len(ranks) < world:  # rank 0 and 1 wait for rank 2 and give up: the attempt fails
            assert all(isinstance(v, RuntimeError) for v in got.values()), got
            continue
        assert len(set(got.values())) == 1 and isinstance(got[0], int), got
        assert got[0] not in seen
        seen.append(got[0])


def test_a_killed_agent_takes_its_workers_and_the_survivor_names_the_missing_node(tmp_path):
    """SIGKILL to node 1's torchrun agent only: its worker ends within seconds and says why (it was left training
    as an orphan); node 0's worker loses it at a collective, and its restart (``--max-restarts 1``) names the
    node that did not join and how long it waited, one line each, no traceback of the worker's."""
    args = [*LONG, "-o", str(tmp_path), "train.dist_timeout=4", "--epochs", "50"]
    nodes, _ = start_nodes(args, restarts=1)
    try:
        wait_for(nodes, "(3)  loss")
        (worker,) = _descendants(nodes[1].proc.pid)
        start = time.time()
        os.kill(nodes[1].proc.pid, signal.SIGKILL)
        while os.path.exists(f"/proc/{worker}") and _state(worker) != "Z" and time.time() - start < 10:
            time.sleep(0.05)
        orphan_s = time.time() - start
        code = nodes[0].wait(timeout=120)
    finally:
        kill_all(nodes)
        if os.path.exists(f"/proc/{worker}") and _state(worker) != "Z":
            os.kill(worker, signal.SIGKILL)
    assert orphan_s < 5, f"node 1's worker outlived its agent by {orphan_s:.1f} s"
    nodes[1].reader.join(timeout=10)
    assert f"rank 1: its torchrun agent (pid {nodes[1].proc.pid}) died; this worker stops too" in nodes[1].text
    survivor = nodes[0].text
    assert code != 0 and "lost another rank in a collective" in survivor, survivor[-3000:]
    assert "rank 0: node 1 (rank 1) did not join this attempt within 4 s (train.dist_timeout)" in survivor, survivor[-3000:]
    assert "[rank0]: Traceback" not in survivor, survivor[-3000:]
