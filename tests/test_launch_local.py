"""launch.local's process handling, on stand-in processes (no training)."""

import os
import signal
import subprocess
import sys
import time

from conftest import REPO, processes_mentioning, started

# A stand-in for a trainer: reports once its SIGTERM handler is in place,
# and on SIGTERM writes the file named by its argument and exits.
CHILD = """
import signal, sys, time
def stop(*_):
  open(sys.argv[1], "w").write("stopped")
  sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(120)
"""
# Starts the stand-in through launch.local's Job, then waits forever.
LAUNCHER = """
import sys, time
from launch import local
local.Job([[sys.executable, "-c", sys.argv[1], sys.argv[2]]], {})
time.sleep(120)
"""


def test_processes_stop_when_the_launcher_is_killed(tmp_path):
  stopped = tmp_path / "stopped"
  with started(
      [sys.executable, "-c", LAUNCHER, CHILD, str(stopped)],
      str(stopped),
      cwd=REPO,
      env=dict(os.environ, PYTHONPATH=str(REPO)),
      stdout=subprocess.PIPE,
      text=True,
  ) as launcher:
    assert launcher.stdout.readline() == "[0] ready\n"  # Relayed from the child.
    child = [pid for pid in processes_mentioning(str(stopped)) if pid != launcher.pid]
    assert len(child) == 1
    launcher.send_signal(signal.SIGKILL)  # No handler runs: the kernel tells the child.
    launcher.wait()
    deadline = time.time() + 60
    while not stopped.exists() or processes_mentioning(str(stopped)):
      assert time.time() < deadline, "the launcher's process outlived it"
      time.sleep(0.05)
  assert stopped.read_text() == "stopped"
