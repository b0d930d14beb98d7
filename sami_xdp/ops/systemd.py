"""systemd's service notification protocol (sd_notify(3)), without libsystemd.

`Type=notify`: the agent says READY=1 once it listens, and, when the unit sets
WatchdogSec=, WATCHDOG=1 at half that interval from its accept loop, so a hung
loop gets the service restarted. Outside systemd (no NOTIFY_SOCKET) it does
nothing."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field


def _address(env: dict[str, str]) -> str | None:
    path = env.get("NOTIFY_SOCKET", "")
    if not path or not (path.startswith("/") or path.startswith("@")):
        return None
    return "\0" + path[1:] if path.startswith("@") else path


def _watchdog_s(env: dict[str, str]) -> float | None:
    """Half the unit's WatchdogSec, if the watchdog is meant for this process."""
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2e6


@dataclass
class ServiceNotifier:
    address: str | None
    watchdog_s: float | None
    _last: float = field(default=0.0)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ServiceNotifier:
        e = dict(os.environ if env is None else env)
        return cls(_address(e), _watchdog_s(e))

    def send(self, state: str) -> bool:
        if self.address is None:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            try:
                s.connect(self.address)
                s.sendall(state.encode())
            except OSError:
                return False  # systemd went away: nothing to tell
        return True

    def ready(self, status: str = "") -> None:
        self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))
        self._last = time.monotonic()

    def tick(self) -> None:
        """Called from the serving loop; pets the watchdog when it is due."""
        if self.watchdog_s is None:
            return
        now = time.monotonic()
        if now - self._last >= self.watchdog_s:
            self.send("WATCHDOG=1")
            self._last = now

    def stopping(self) -> None:
        self.send("STOPPING=1")
