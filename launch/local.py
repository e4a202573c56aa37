"""Runs N processes of `mnv2_flax.main` on this machine as one JAX job.

  python -m launch.local --num_processes=2 --devices_per_process=2 -- \\
      --workdir=/tmp/digits_mp

exercises the multi-host code path (global mesh, per-process data, collective
checkpoints) without a cluster. Every flag after `--` goes to each process,
which also gets --coordinator_address=localhost:PORT, --num_processes and
--process_id. Output lines are prefixed with `[process_id]`.

If a process fails, the others are killed (they cannot go on without it) and
the launcher exits with that process's status. SIGTERM or SIGINT
(Ctrl-C) reaches every process as SIGTERM, JAX's preemption notice: they agree
on a step, checkpoint it and exit 0, so re-running the command resumes. A
second signal kills them. If the launcher itself dies (SIGKILL, the OOM
killer), each process gets SIGTERM from the kernel (Linux) and stops the same
way, rather than training on with no one relaying its output.

JAX's persistent compilation cache is switched off for multi-process CPU
runs (see mnv2_flax/main.py): only process 0 would hit it, and a process that
reaches the first collective 30 s after another fails gloo's rendezvous.
On a GPU machine one process already drives every GPU (see
launch/__init__.py); to try this launcher there, set JAX_PLATFORMS=cpu.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_processes", 2, "Number of processes.", lower_bound=1)
flags.DEFINE_integer(
    "devices_per_process",
    None,
    "CPU devices per process (XLA's forced host device count); "
    "unset: the backend's own devices.",
    lower_bound=1,
)
flags.DEFINE_integer("port", None, "Coordinator port; a free one if unset.")

# Set by the launcher itself; passing them after `--` would contradict it.
RESERVED_FLAGS = (
    "--coordinator_address",
    "--num_processes",
    "--process_id",
    "--jax_distributed_auto",
)
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def child_env(devices_per_process: int | None) -> dict[str, str]:
  """This environment (JAX_PLATFORMS etc. pass through) plus the device count."""
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  if devices_per_process is not None:
    kept = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    env["XLA_FLAGS"] = " ".join(kept + [f"{DEVICE_COUNT_FLAG}={devices_per_process}"])
  return env


def relay(stream: IO[bytes], prefix: bytes, lock: threading.Lock) -> None:
  """Copies a child's output to ours line by line, each line prefixed."""
  for line in iter(stream.readline, b""):
    with lock:
      sys.stdout.buffer.write(prefix + line)
      sys.stdout.buffer.flush()


def exit_status(returncode: int) -> int:
  # A child killed by signal N reports -N; shells report 128 + N.
  return returncode if returncode >= 0 else 128 - returncode


def stop_when_parent_dies() -> Callable[[], None] | None:
  """A Popen preexec_fn: SIGTERM to the child when its parent dies (Linux's
  PR_SET_PDEATHSIG); None elsewhere."""
  if not sys.platform.startswith("linux"):
    return None
  prctl = ctypes.CDLL(None, use_errno=True).prctl  # Looked up before the fork.
  parent = os.getpid()

  def preexec() -> None:
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # It died before prctl took effect.
      os.kill(os.getpid(), signal.SIGTERM)

  return preexec


class Job:
  """The child processes, their output relays, and what signals do to them."""

  def __init__(self, commands: Sequence[Sequence[str]], env: dict[str, str]):
    lock = threading.Lock()
    self._signals_received = 0
    # A session of its own: a terminal's Ctrl-C reaches the launcher only,
    # which then sends SIGTERM (the notice JAX's preemption sync acts on).
    # Every child is forked before any relay thread starts (preexec_fn).
    self.processes = [
        subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=stop_when_parent_dies(),
        )
        for command in commands
    ]
    self._relays = [
        threading.Thread(target=relay, args=(p.stdout, f"[{i}] ".encode(), lock), daemon=True)
        for i, p in enumerate(self.processes)
    ]
    for relay_thread in self._relays:
      relay_thread.start()

  def send(self, sig: int) -> None:
    for p in self.processes:
      if p.poll() is None:
        p.send_signal(sig)

  def on_signal(self, signum: int, frame) -> None:
    del frame
    self._signals_received += 1
    if self._signals_received == 1:
      logging.warning("Signal %d: asking every process to checkpoint and stop.", signum)
      self.send(signal.SIGTERM)
    else:
      logging.warning("Signal %d again: killing every process.", signum)
      self.send(signal.SIGKILL)

  def wait(self) -> int:
    """0 when every process succeeds, else the first failure's exit status."""
    while True:
      codes = [p.poll() for p in self.processes]
      failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i = failed[0]
        logging.error("Process %d exited with status %d; killing the others.", i, codes[i])
        self.send(signal.SIGKILL)
        status = exit_status(codes[i])
        break
      if all(c == 0 for c in codes):
        status = 0
        break
      time.sleep(0.1)
    for p in self.processes:
      p.wait()
    for relay_thread in self._relays:
      relay_thread.join()
    return status


def main(argv: list[str]) -> None:
  child_flags = argv[1:]
  for flag in child_flags:
    if flag.split("=", 1)[0] in RESERVED_FLAGS:
      raise app.UsageError(f"{flag.split('=', 1)[0]} is set by the launcher")
  port = FLAGS.port or free_port()
  commands = [
      [
          sys.executable,
          "-m",
          "mnv2_flax.main",
          *child_flags,
          f"--coordinator_address=localhost:{port}",
          f"--num_processes={FLAGS.num_processes}",
          f"--process_id={i}",
      ]
      for i in range(FLAGS.num_processes)
  ]
  logging.info("Starting %d processes, coordinator localhost:%d.", FLAGS.num_processes, port)
  job = Job(commands, child_env(FLAGS.devices_per_process))
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, job.on_signal)
  sys.exit(job.wait())


if __name__ == "__main__":
  app.run(main)
