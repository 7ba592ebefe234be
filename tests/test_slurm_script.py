"""scripts/slurm_ahbf.sbatch, run by bash with a fake ``srun`` and ``scontrol`` on PATH: what it launches (cpus
per task passed on, a port of its own, torchrun's shutdown grace) and when it requeues (after its stop signal
or a preemption's SIGTERM, within the requeue limit; never after an error or a finished run). docs/training.md
shows the script verbatim."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_ahbf.sbatch"

# srun: record the cpus it passes on, run its task (node 0's bash -c, whose torchrun records its command line),
# then act as told by $FAKE_RUN: finish (results.json, exit 0), exit:N, or run until SIGTERM and then exit 1 as
# torchrun does after a signal (its workers exit 75)
FAKE_SRUN = """#!/bin/bash
echo "srun cpus=$SRUN_CPUS_PER_TASK $*" >> "$FAKE_LOG"
SLURM_NODEID=0 bash -c "${@: -1}"
case "$FAKE_RUN" in
    finish) touch "$OUT/results.json"; exit 0 ;;
    exit:*) exit "${FAKE_RUN#exit:}" ;;
    run) trap 'echo "srun got TERM" >> "$FAKE_LOG"; exit 1' TERM
         echo started >> "$FAKE_LOG"; while true; do sleep 0.05; done ;;
esac
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
    "show hostnames") echo node17; echo node18 ;;
    requeue*) echo "scontrol $*" >> "$FAKE_LOG" ;;
esac
"""


def run_script(tmp_path, outcome: str, signal_to_send=None, restarts: int = 0):
    bin_dir, out = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    fake_torchrun = '#!/bin/bash\necho "torchrun $*" >> "$FAKE_LOG"\n'
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("torchrun", fake_torchrun)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    log.write_text("")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_LOG": str(log), "FAKE_RUN": outcome, "OUT": str(out),
           "SLURM_JOB_ID": "123457", "SLURM_JOB_NODELIST": "node[17-18]", "SLURM_NNODES": "2",
           "SLURM_CPUS_PER_TASK": "64", "SLURM_RESTART_COUNT": str(restarts)}
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if signal_to_send is not None:
        deadline = time.time() + 20
        while "started" not in log.read_text():
            assert time.time() < deadline and proc.poll() is None, proc.communicate()[0]
            time.sleep(0.02)
        proc.send_signal(signal_to_send)
    output, _ = proc.communicate(timeout=30)
    return proc.returncode, output, log.read_text()


def test_the_step_gets_its_cpus_a_port_of_its_own_and_a_grace_above_a_checkpoint(tmp_path):
    code, output, log = run_script(tmp_path, "finish")
    assert code == 0 and "finished" in output and "scontrol requeue" not in log, output + log
    assert "srun cpus=64 --kill-on-bad-exit=1" in log
    torchrun = next(line for line in log.splitlines() if line.startswith("torchrun "))
    assert "--master_addr node17 --master_port 23457 --rdzv_id 123457" in torchrun  # 20000 + job id % 20000
    assert "--shutdown-timeout 240" in torchrun and "--resume auto" in torchrun
    assert f"-o {tmp_path / 'run'}" in torchrun
    head = SCRIPT.read_text()
    lead = int(re.search(r"--signal=B:USR1@(\d+)", head).group(1))
    assert 240 < lead  # the workers' grace ends before the time limit


@pytest.mark.parametrize("sig, why", [(signal.SIGUSR1, "the time-limit signal (USR1)"),
                                      (signal.SIGTERM, "SIGTERM (a preemption)")])
def test_a_stop_is_forwarded_to_the_run_and_requeues(tmp_path, sig, why):
    code, output, log = run_script(tmp_path, "run", signal_to_send=sig)
    assert "srun got TERM" in log, output + log  # passed on to the agents, which stop the workers
    assert code == 0 and "scontrol requeue 123457" in log and f"stopped by {why}; requeueing" in output, output + log


def test_the_requeue_limit(tmp_path):
    code, output, log = run_script(tmp_path, "run", signal_to_send=signal.SIGUSR1, restarts=20)
    assert code == 75 and "scontrol requeue" not in log and "requeued 20 times already" in output, output + log


@pytest.mark.parametrize("status", [1, 2, 3, 69, 74])
def test_a_failed_run_is_never_requeued(tmp_path, status):
    """torchrun exits 1 whatever its workers' status (2 bad input, 3 non-finite loss, 74 a failed write, 69 a
    lost node); without the script's own stop signal none of these is requeued."""
    code, output, log = run_script(tmp_path, f"exit:{status}")
    assert code == status and "scontrol requeue" not in log and "not requeued" in output, output + log


def test_exit_75_without_torchrun_requeues(tmp_path):
    code, output, log = run_script(tmp_path, "exit:75")
    assert code == 0 and "scontrol requeue 123457" in log, output + log


def test_docs_show_the_script_verbatim():
    doc = (ROOT / "docs" / "training.md").read_text()
    block = re.search(r"```bash\n(#!/bin/bash\n.*?)```", doc, flags=re.S)
    assert block and block.group(1) == SCRIPT.read_text(), "docs/training.md's SLURM script differs from the file"
