"""The bpffs directory that holds every pinned object of one firewall."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ..base.errors import BpffsError, NotRootError

DEFAULT_BPFFS = "/sys/fs/bpf/samixdp"


def resolve(bpffs: str | None) -> Path:
    return Path(bpffs or os.environ.get("SAMIXDP_BPFFS") or DEFAULT_BPFFS)


def _mount_of(path: Path) -> tuple[str, str]:
    """(mount point, fs type) of the deepest mount containing `path`."""
    best = ("/", "")
    target = str(path)
    with open("/proc/self/mounts") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) < 3:
                continue
            mnt = parts[1].replace("\\040", " ")
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                best[0]
            ):
                best = (mnt, parts[2])
    return best


def is_bpffs(path: Path) -> bool:
    return _mount_of(path)[1] == "bpf"


def _private_mount_ns() -> bool:
    """True inside `ip netns exec` (its mounts die with the command)."""
    try:
        return os.readlink("/proc/self/ns/mnt") != os.readlink("/proc/1/ns/mnt")
    except OSError:
        pass  # PID 1 hidden from us: fall back to "are we in a named netns?"
    try:
        mine = os.stat("/proc/self/ns/net").st_ino
        named = Path("/run/netns")
        return named.is_dir() and any(p.stat().st_ino == mine for p in named.iterdir())
    except OSError:
        return False


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRootError("samixdp needs root (CAP_BPF and CAP_NET_ADMIN): run it with sudo")


def ensure(path: Path) -> Path:
    """Makes sure `path` is a directory on a bpffs, mounting one if needed.

    Under /sys/fs/bpf the standard mount point is used; anywhere else (e.g.
    /run/..., which `ip netns exec` does not hide) bpffs is mounted at
    `path` itself."""
    require_root()
    if not is_bpffs(path):
        sys_bpf = Path("/sys/fs/bpf")
        mnt = sys_bpf if (path == sys_bpf or sys_bpf in path.parents) else path
        mnt.mkdir(parents=True, exist_ok=True)
        if _private_mount_ns():
            # `ip netns exec` runs us in a throw-away mount namespace: a bpffs
            # mounted here would vanish with this command, and the pins with it
            raise BpffsError(
                f"{path} is not a bpffs and this command runs in a private mount namespace "
                f"(ip netns exec): mount it from the host first: mount -t bpf bpf {mnt}"
            )
        cmd = ["mount", "-t", "bpf", "bpf", str(mnt)]
        rc = subprocess.run(cmd, capture_output=True, text=True)
        if rc.returncode != 0 or not is_bpffs(path):
            raise BpffsError(f"cannot mount bpffs at {mnt}: {rc.stderr.strip() or 'not bpf'}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BpffsError(f"cannot create {path}: {exc.strerror}") from exc
    return path


def check_existing(path: Path) -> Path:
    """For commands that only read state: the directory must already hold pins."""
    require_root()
    if not path.is_dir() or not is_bpffs(path):
        raise BpffsError(
            f"no sami-xdp state at {path} (not a bpffs directory): run `samixdp attach IFACE` "
            "first, or pass --bpffs / SAMIXDP_BPFFS"
        )
    return path
