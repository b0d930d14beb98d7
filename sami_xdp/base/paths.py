"""Where the BPF sources live: next to the package in a checkout/editable
install, in the environment's share/samixdp/bpf when installed, or wherever
SAMIXDP_BPF_DIR points."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def bpf_dir() -> Path:
    """SAMIXDP_BPF_DIR, else the checkout's bpf/, else an installed copy
    (`make install` puts it under the environment's share/samixdp/bpf)."""
    env = os.environ.get("SAMIXDP_BPF_DIR")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[2] / "bpf"
    if (checkout / "fw_xdp.c").exists():
        return checkout
    return Path(sys.prefix) / "share" / "samixdp" / "bpf"


def header_path() -> Path:
    return bpf_dir() / "session_map.h"


def program_path() -> Path:
    return bpf_dir() / "fw_xdp.c"
