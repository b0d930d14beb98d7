"""Where the BPF sources live: next to the package in a checkout/editable
install, or wherever SAMIXDP_BPF_DIR points."""

from __future__ import annotations

import os
from pathlib import Path


def bpf_dir() -> Path:
    env = os.environ.get("SAMIXDP_BPF_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "bpf"


def header_path() -> Path:
    return bpf_dir() / "session_map.h"


def program_path() -> Path:
    return bpf_dir() / "fw_xdp.c"
