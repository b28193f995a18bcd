"""One process of a multi-process job, watched by a parent that explains a lost peer.

When a process of a jax.distributed job dies (a host lost, SIGKILL), the others cannot go on:
their next collective fails, and once the dead process misses its heartbeats the coordination
service ends every other process from C++ (`Terminating process because the JAX distributed
service detected fatal errors`, then a stack dump and exit 134). Python never gets control
back, so the explanation has to come from outside: `supervise` runs the real command as a
child, passes its output through, holds back what follows the first sign of a lost peer, and
when the child then dies prints one line instead: which process stopped answering, the latest
checkpoint, and that relaunching the same command resumes from it (exit LOST_PEER_EXIT).
"""
from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading

from etils import epath

SUPERVISED = "EDGEPOPUP_SUPERVISED"  # set in the child's environment
LOST_PEER_EXIT = 3
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# The first signs of a lost peer, in the output of a survivor.
TROUBLE = re.compile(r"heartbeat|Connection closed by peer|Connection reset by peer|Socket closed|"
                     r"detected fatal errors|unhealthy|Gloo .* failed|NCCL .*(error|failure)",
                     re.IGNORECASE)
# Which process it was: "Task 1 heartbeat timeout", or the ids on the lines after "(stopped
# sending heartbeats):"; the coordinator (process 0) gone shows as its socket closed.
TASK_TIMEOUT = re.compile(r"Task (\d+) heartbeat timeout")
UNHEALTHY_LIST = re.compile(r"stopped sending heartbeats\):\s*$")
COORDINATOR_GONE = re.compile(r"Socket closed|failed to connect to all addresses|"
                              r"Failed to send RPC to coordination service", re.IGNORECASE)


def multi_process(coordinator_address, multihost: bool) -> bool:
    """Whether main.py's flags (or SLURM) make this one process of several."""
    return bool(coordinator_address) or multihost or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def latest_checkpoint(workdir: str) -> int | None:
    directory = epath.Path(workdir) / "checkpoints"
    try:
        steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
    except OSError:
        return None
    return max(steps) if steps else None


class _Watch:
    """Reads the child's stderr: echoes it until the first sign of trouble, then holds it. A
    Python traceback is held until its exception line, which may be the first sign (a
    collective that fails in Python, not C++, when a peer is gone)."""

    def __init__(self, stream, out):
        self.stream, self.out = stream, out
        self.trouble, self.held, self.lost = False, [], set()
        self.coordinator_gone = False
        self._list_follows = False
        self._traceback: list[str] = []

    def read(self) -> None:
        for line in self.stream:
            self._note(line)
            if self.trouble:
                self.held += self._traceback + [line]
                self._traceback = []
            elif self._traceback or line.startswith("Traceback (most recent call last)"):
                self._traceback.append(line)
                if not line.startswith((" ", "\t", "Traceback")) and line.strip():
                    self._echo(self._traceback)  # its exception line, and no trouble in it
                    self._traceback = []
            else:
                self._echo([line])
        self.held += self._traceback  # a traceback cut short by the process's end

    def _echo(self, lines: list[str]) -> None:
        self.out.writelines(lines)
        self.out.flush()

    def _note(self, line: str) -> None:
        if self._list_follows:
            ids = re.findall(r"\d+", line)
            self.lost.update(int(i) for i in ids)
            self._list_follows = bool(ids)
        if UNHEALTHY_LIST.search(line):
            self._list_follows = True
        self.lost.update(int(i) for i in TASK_TIMEOUT.findall(line))
        self.coordinator_gone |= bool(COORDINATOR_GONE.search(line))
        self.trouble |= bool(TROUBLE.search(line))


def lost_peer_message(lost: set, coordinator_gone: bool, process_id, num_processes,
                      workdir: str) -> str:
    others = sorted(lost - {process_id}) if process_id is not None else sorted(lost)
    if others:
        who = ", ".join(f"process {i}" for i in others)
        who = f"{who} stopped answering"
    elif coordinator_gone and process_id != 0:
        who = "process 0 (the coordinator) stopped answering"
    else:
        who = "another process stopped answering"
    of = f" of {num_processes}" if num_processes else ""
    step = latest_checkpoint(workdir)
    saved = (f"the latest checkpoint is step {step} in {epath.Path(workdir) / 'checkpoints'}"
             if step is not None else "no checkpoint was saved yet")
    me = f"process {process_id}{of}" if process_id is not None else "this process"
    return (f"error: lost a peer: {who}, so {me} stopped; {saved}. Relaunch the same command "
            "on every host to resume from it")


def die_with(parent_pid: int):
    """A preexec_fn: the child is SIGKILLed when its parent dies, so a supervisor killed by
    SIGKILL (the OOM killer, a scheduler, a user) leaves no worker training on (Linux's
    PR_SET_PDEATHSIG; elsewhere nothing). SIGTERM and SIGINT reach the supervisor first, which
    passes them on, so a preemption still saves a checkpoint."""
    def arm():
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent_pid:  # the parent died before the prctl took hold
                os.kill(os.getpid(), signal.SIGKILL)
    return arm


def supervise(argv: list[str], *, workdir: str, process_id=None, num_processes=None) -> int:
    """Runs `python argv` as a child (with SUPERVISED set) and returns its exit code, or
    LOST_PEER_EXIT with the one-line message when it died after a lost peer. SIGTERM and SIGINT
    are passed on to the child (a preemption notice still saves a checkpoint there)."""
    env = {**os.environ, SUPERVISED: "1", "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen([sys.executable, *argv], env=env, stderr=subprocess.PIPE, text=True,
                             errors="replace", preexec_fn=die_with(os.getpid()))
    forward = lambda signum, _frame: child.send_signal(signum)  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    watch = _Watch(child.stderr, sys.stderr)
    reader = threading.Thread(target=watch.read, daemon=True)
    reader.start()
    try:
        code = child.wait()
        reader.join(timeout=10)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code != 0 and watch.trouble:
        print(lost_peer_message(watch.lost, watch.coordinator_gone, process_id, num_processes,
                                workdir), file=sys.stderr, flush=True)
        return LOST_PEER_EXIT
    sys.stderr.writelines(watch.held)  # trouble that did not end the run: show it after all
    return code if code >= 0 else 128 - code
