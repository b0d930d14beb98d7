"""ACL lookup cost per packet (BPF_PROG_TEST_RUN), independent of other VMs' rules.

Loads N_VMS VMs with RULES_PER_OTHER rules each, then measures a packet to
the target VM that scans all of its rules and is denied by the last one
(worst case: a denied packet makes no session, so every repeat walks the
ACL again). Prints ns/packet (median of runs) for 1 and 64 target rules,
with and without the other VMs loaded. Run as root: python bench/acl_cost.py
"""

from __future__ import annotations

import ipaddress
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from sami_xdp.loader import bpfsys
from sami_xdp.loader.compile import Limits
from sami_xdp.loader.pinned import Firewall, unpin_all
from sami_xdp.policy import acl, protect
from sami_xdp.policy.config import create_firewall
from testbed import packets as P

N_VMS = 10_000
RULES_PER_OTHER = 4
REPEAT = 1_000_000
RUNS = 5
TARGET = "10.200.0.1"
CLIENT = "192.0.2.10"


def vm_addr(i: int) -> str:
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.0.0.1")) + i))


def target_rules(fw: Firewall, n: int) -> list[acl.AclRule]:
    rules = [acl.make_rule(fw, vm=TARGET, proto="udp", dport=str(2000 + i)) for i in range(n - 1)]
    rules.append(acl.make_rule(fw, vm=TARGET, proto="udp", dport="9999", action="deny"))
    return rules


def other_rules(fw: Firewall) -> list[acl.AclRule]:
    return [
        acl.make_rule(fw, vm=vm_addr(i), proto="tcp", dport=str(22 + j))
        for i in range(N_VMS)
        for j in range(RULES_PER_OTHER)
    ]


def measure(fw: Firewall, frame: bytes) -> float:
    runs = [bpfsys.prog_test_run(fw.prog_fd, frame, repeat=REPEAT).duration_ns for _ in range(RUNS)]
    return float(statistics.median(runs))


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="samixdp-bench-", dir="/run"))
    subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], check=True)
    try:
        fw = create_firewall(root / "fw", Limits(max_sessions=65536))
        protect.add_protected(fw, "10.0.0.0/8")
        frame = P.udp(CLIENT, 5000, TARGET, 9999)
        t0 = time.perf_counter()
        others = other_rules(fw)
        results = {}
        for label, with_others in (("alone", False), ("with_10k_vms", True)):
            for n in (1, 64):
                base = others if with_others else []
                t0 = time.perf_counter()
                acl.load_rules(fw, base + target_rules(fw, n))
                load_s = time.perf_counter() - t0
                assert bpfsys.prog_test_run(fw.prog_fd, frame).retval == 1  # XDP_DROP
                results[f"{label}/{n}_rules"] = {
                    "ns_per_packet": measure(fw, frame),
                    "rules_loaded": len(base) + n,
                    "load_s": round(load_s, 3),
                }
        fw.close()
    finally:
        unpin_all(root / "fw")
        subprocess.run(["umount", "-l", str(root)], check=False)
        root.rmdir()
    print(f"{'case':28} {'ns/pkt':>8} {'rules loaded':>13} {'reload s':>9}")
    for k, v in results.items():
        print(f"{k:28} {v['ns_per_packet']:8.1f} {v['rules_loaded']:13d} {v['load_s']:9.3f}")
    out = Path(__file__).parent / "results" / "acl_cost.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "results": results}, indent=2))


if __name__ == "__main__":
    main()
