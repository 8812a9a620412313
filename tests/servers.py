"""Server processes for tests: started in their own process group, stopped as a whole group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MLFLOW = str(Path(sys.executable).parent / "mlflow")


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def group_members(pgid: int) -> list[int]:
    """The ids of the live processes in process group `pgid` (zombies excepted)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def start(command: list[str], log: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    """A server in a new session (its own process group), output to `log`; the virtualenv's
    scripts (uvicorn, which `mlflow models serve` runs) come first on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    environment = {**os.environ, "PYTHONPATH": str(REPO), "PATH": path, **(env or {})}
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=environment,
                                start_new_session=True, cwd=cwd)


def wait_ready(process: subprocess.Popen, url: str, log: Path, timeout: float = 180) -> None:
    """Returns once `url` answers 200; fails with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer in {timeout} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen, timeout: float = 30) -> list[int]:
    """SIGTERM to the server's whole process group, SIGKILL to what is left after `timeout`;
    returns the group's members still alive afterwards (none when it stopped cleanly)."""
    pgid = process.pid  # the session leader's pid is its group's id
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while group_members(pgid) and time.monotonic() < deadline:
        process.poll()
        time.sleep(0.5)
    leftovers = group_members(pgid)
    if leftovers:
        os.killpg(pgid, signal.SIGKILL)
    process.wait(timeout=10)
    return leftovers
