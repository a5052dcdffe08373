"""
Run C{twistd easybackend} as a real process for end-to-end tests, and
learn its ports from its log instead of guessing or sleeping.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol

#: log lines that say a listener is up: (name, pattern with the port)
LISTENING = {
    "http": re.compile(rb"Site(?: \(TLS\))? starting on (\d+)"),
    "websocket": re.compile(rb"ChatServerFactory(?: \(TLS\))? starting on (\d+)"),
    "grpc": re.compile(rb"gRPC listening on .*?\(port (\d+)"),
}


class ServerProcess(ProcessProtocol):
    """
    One C{twistd -n easybackend} process.  C{ports} fills in as its log
    says each listener is up; C{started} fires once the given listeners
    are; C{ended} fires with the exit reason.
    """

    def __init__(self, wait_for: tuple[str, ...] = ("http",)) -> None:
        self.output = b""
        self.ports: dict[str, int] = {}
        self._wait_for = wait_for
        self.started: Deferred[dict[str, int]] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.exit_code: int | None = None
        self.exit_signal: int | None = None

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for name, pattern in LISTENING.items():
            if name not in self.ports:
                match = pattern.search(self.output)
                if match:
                    self.ports[name] = int(match.group(1))
        if not self.started.called and all(n in self.ports for n in self._wait_for):
            self.started.callback(self.ports)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if isinstance(reason.value, (ProcessDone, ProcessTerminated)):
            self.exit_code = reason.value.exitCode
            self.exit_signal = reason.value.signal
        if not self.started.called:
            self.started.errback(RuntimeError(
                "server exited before listening:\n" + self.output.decode("utf-8", "replace")
            ))
        self.ended.callback(None)

    @property
    def clean_exit(self) -> bool:
        """Exited 0, or by the SIGTERM it was sent (twistd re-raises it)."""
        return self.exit_code == 0 or self.exit_signal == signal.SIGTERM

    def signal(self, name: str = "TERM") -> None:
        if self.transport is not None and self.transport.pid is not None:
            self.transport.signalProcess(name)


def twistd_args(*options: str) -> list[str]:
    """The command line of C{twistd -n easybackend} with C{options}."""
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return [sys.executable, twistd, "-n", "--pidfile=", "easybackend", *options]


def spawn(
    *options: str,
    env: dict[str, str] | None = None,
    wait_for: tuple[str, ...] = ("http",),
    cwd: str | None = None,
) -> ServerProcess:
    """Start a server with C{options}; wait on C{.started} for its ports."""
    from twisted.internet import reactor

    environ = {k: v for k, v in os.environ.items()
               if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "EASYBACKEND_DB")}
    environ["PYTHONUNBUFFERED"] = "1"
    environ.update(env or {})
    process = ServerProcess(wait_for)
    args = twistd_args(*options)
    reactor.spawnProcess(process, args[0], args, env=environ, path=cwd)
    return process


def kill(process: ServerProcess) -> Deferred[None]:
    """SIGKILL, for cleanups and crash tests; fires once the process is gone."""
    try:
        if process.transport is not None and process.transport.pid is not None:
            os.kill(process.transport.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return process.ended
