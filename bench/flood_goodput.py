"""Established TCP goodput during a spoofed SYN flood to an allowed port, as a
ratio to the same flow without the flood: sami-xdp vs nftables conntrack, in one run.

On the core topology (client -- firewall host routing -- VM), the VM runs an iperf3
server (port 5201) and a listener on FLOOD_PORT; both ports are allowed towards the VM
(sami-xdp: two ACL rules; nftables: the same policy over conntrack, with a `fib`
reverse-path check like sami-xdp's anti-spoofing). Each measurement is one iperf3
connection from the client, established before anything else happens, sending for
`--seconds` + 2 s; in a flood measurement, hping3 (`-S --flood --rand-source`, the
attacker's tool) sends spoofed SYNs to FLOOD_PORT from the client's namespace during
the middle `--seconds` (bounded by `timeout -s INT`, its packet count read from its
own statistics). Goodput is taken from iperf3's one-second intervals inside the flood
window only, the same window in the runs without flood.

sami-xdp runs in native and in generic mode (`--mode auto` now picks tc on veth; tc
is not measured here yet). Native XDP on veth queues each frame in the receiving veth's
ring before the program runs; the flood fills that ring and the flow's own segments are dropped
there (`veth_tx_dropped` in the results), before any firewall logic sees them.

Each round measures, for each firewall (the order alternating between rounds): no
flood, then flood; the firewall is set up fresh for each (sami-xdp: attach and ACL,
then `reset`; nftables: the table, then flushed with conntrack). The figure per
firewall is the median over rounds of flood / no-flood; the two are compared side by
side, since this machine is shared and noisy. Both firewalls run on the same two CPUs
as the attacker, the client and the VM: the ratio shows how much of the flow survives
the attack's CPU and table pressure, not line rate.

Run as root (about 2 minutes with the defaults):
    .venv/bin/python bench/flood_goodput.py [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

from testbed.netns import Lab, Netns
from testbed.topology import CLIENT_IP, VM_IP, VM_NET, CoreTopology, build_core

ROOT = Path(__file__).resolve().parent.parent
IPERF_PORT = 5201
FLOOD_PORT = 8080
LEAD_S = 1.0  # the flow runs alone this long before the flood starts (and after it ends)

NFT_RULESET = f"""
table inet sxbench {{
    chain sxpre {{
        type filter hook prerouting priority -150; policy accept;
        ip saddr {VM_NET} fib saddr . iif oif missing counter drop
    }}
    chain sxfwd {{
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        ct state invalid counter drop
        ip saddr {VM_NET} ct state new accept
        ip daddr {VM_IP} tcp dport {{ {IPERF_PORT}, {FLOOD_PORT} }} ct state new counter accept
    }}
}}
"""


class Firewall:
    name = ""

    def setup(self, t: CoreTopology) -> None: ...

    def teardown(self, t: CoreTopology) -> None: ...

    def drops(self, t: CoreTopology) -> dict[str, int]:
        return {}


class SamiXdp(Firewall):
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.name = f"sami-xdp {mode}"

    def setup(self, t: CoreTopology) -> None:
        for link in t.fw_links:
            t.samixdp("attach", link, "--protect", VM_NET, "--mode", self.mode, check=True)
        for port in (IPERF_PORT, FLOOD_PORT):
            t.samixdp("acl", "add", "--vm", VM_IP, "--proto", "tcp", "--dport", str(port),
                      check=True)

    def teardown(self, t: CoreTopology) -> None:
        for link in t.fw_links:
            t.samixdp("detach", link, check=True)
        t.samixdp("reset", "--yes", check=True)

    def drops(self, t: CoreTopology) -> dict[str, int]:
        stats = t.samixdp_json("stats")
        assert isinstance(stats, dict)
        return {reason: int(n) for reason, n in stats.items() if n}


class NoFilter(Firewall):
    name = "no filter"


class Nftables(Firewall):
    name = "nftables"

    def setup(self, t: CoreTopology) -> None:
        path = t.lab.run_dir / "nft.rules"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(NFT_RULESET)
        t.fw.run("nft", "-f", path)

    def teardown(self, t: CoreTopology) -> None:
        t.fw.run("nft", "delete", "table", "inet", "sxbench")
        t.fw.run("conntrack", "-F", check=False)

    def drops(self, t: CoreTopology) -> dict[str, int]:
        out = t.fw.run("nft", "-j", "list", "table", "inet", "sxbench").stdout
        counts: dict[str, int] = {}
        for item in json.loads(out)["nftables"]:
            rule = item.get("rule")
            if not rule:
                continue
            for expr in rule["expr"]:
                if "counter" in expr:
                    counts[f"{rule['chain']}#{rule['handle']}"] = int(expr["counter"]["packets"])
        cnt = t.fw.run("conntrack", "-C", check=False).stdout.strip()
        counts["conntrack entries"] = int(cnt) if cnt.isdigit() else -1
        return counts


def goodput(t: CoreTopology, seconds: float, flood: bool, port: int) -> dict:
    """One iperf3 flow of seconds + 2 * LEAD_S; the mean goodput (bit/s) of its
    intervals inside [LEAD_S, LEAD_S + seconds], with or without the flood there."""
    total = int(seconds + 2 * LEAD_S)
    drops_before = veth_drops(t)
    client = t.lab.spawn(t.client, "iperf3", "-c", VM_IP, "-p", str(IPERF_PORT), "-t",
                         str(total), "-i", "1", "-J", lifetime=total + 30)
    sent = 0
    if flood:
        time.sleep(LEAD_S)
        res = t.client.run("timeout", "-s", "INT", str(seconds), "hping3", "-S", "--flood",
                           "--rand-source", "-p", str(port), VM_IP, check=False,
                           timeout=seconds + 20)
        m = re.search(r"(\d+) packets transmitted", res.stdout + res.stderr)
        if not m:
            raise SystemExit(f"hping3 printed no statistics: {res.stdout}{res.stderr}")
        sent = int(m.group(1))
    out, _ = client.communicate(timeout=total + 30)
    report = json.loads(out)
    if "error" in report:
        raise SystemExit(f"iperf3: {report['error']}")
    lo, hi = LEAD_S - 0.05, LEAD_S + seconds + 0.05
    window = [iv["sum"] for iv in report["intervals"]
              if iv["sum"]["start"] >= lo and iv["sum"]["end"] <= hi]
    bits = sum(s["bytes"] * 8 for s in window)
    span = sum(s["seconds"] for s in window)
    drops = {k: v - drops_before[k] for k, v in veth_drops(t).items()}
    return {"bits_per_s": bits / span if span else 0.0, "flood_packets": sent,
            "veth_tx_dropped": drops,
            "flood_pps": sent / seconds if flood else 0.0,
            "retransmits": sum(int(s.get("retransmits", 0)) for s in window)}


def veth_drops(t: CoreTopology) -> dict[str, int]:
    """Frames the veths towards the firewall could not hand over (its receive ring
    or backlog full), per sending side."""
    out = {}
    for ns, link in ((t.client, "sxc-fw"), (t.vm, "sxv-fw")):
        info = json.loads(ns.ip("-s", "-j", "link", "show", link).stdout)[0]
        out[link] = int(info["stats64"]["tx"]["dropped"])
    return out


def measure(t: CoreTopology, fw: Firewall, seconds: float, port: int) -> dict:
    fw.setup(t)
    try:
        calm = goodput(t, seconds, flood=False, port=port)
        flooded = goodput(t, seconds, flood=True, port=port)
        drops = fw.drops(t)
    finally:
        fw.teardown(t)
    ratio = flooded["bits_per_s"] / calm["bits_per_s"] if calm["bits_per_s"] else 0.0
    return {"no_flood": calm, "flood": flooded, "ratio": ratio, "counters": drops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="flood length (and window)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="native,generic",
                    help="sami-xdp attach modes, comma-separated (auto picks tc on veth)")
    ap.add_argument("--no-filter", action="store_true", help="also measure with no firewall")
    ap.add_argument("--flood-port", type=int, default=FLOOD_PORT)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "flood_goodput.json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (namespaces, XDP, nftables)")
    if not 1 <= args.seconds <= 60 or not 1 <= args.rounds <= 20:
        raise SystemExit("--seconds must be 1..60 and --rounds 1..20")

    firewalls: list[Firewall] = [*(SamiXdp(m) for m in args.modes.split(",")), Nftables()]
    if args.no_filter:
        firewalls.append(NoFilter())
    runs: dict[str, list[dict]] = {fw.name: [] for fw in firewalls}
    with Lab(tag="g") as lab:
        t = build_core(lab)
        t.client.sysctl("net.ipv4.ip_forward", 0)
        lab.spawn(t.vm, "iperf3", "-s", "-B", VM_IP, "-p", str(IPERF_PORT),
                  lifetime=3600)
        lab.echo_server(t.vm, VM_IP, FLOOD_PORT, lifetime=3600)
        _wait_listening(t.vm, IPERF_PORT)
        for r in range(args.rounds):
            order = firewalls if r % 2 == 0 else firewalls[::-1]
            for fw in order:
                res = measure(t, fw, args.seconds, args.flood_port)
                runs[fw.name].append(res)
                calm = res["no_flood"]["bits_per_s"] / 1e9
                hit = res["flood"]["bits_per_s"] / 1e9
                print(f"round {r + 1} {fw.name:9} no flood {calm:6.2f} Gbit/s, "
                      f"flood {hit:6.2f} Gbit/s"
                      f" ({res['flood']['flood_pps'] / 1e3:.0f} kpps of spoofed SYNs):"
                      f" {res['ratio']:.3f}", flush=True)

    summary = {}
    for name, rs in runs.items():
        summary[name] = {
            "ratio": round(statistics.median(r["ratio"] for r in rs), 3),
            "ratios": [round(r["ratio"], 3) for r in rs],
            "no_flood_gbit_s": round(statistics.median(r["no_flood"]["bits_per_s"]
                                                       for r in rs) / 1e9, 2),
            "flood_gbit_s": round(statistics.median(r["flood"]["bits_per_s"]
                                                    for r in rs) / 1e9, 2),
            "flood_kpps": round(statistics.median(r["flood"]["flood_pps"] for r in rs) / 1e3),
        }
    theirs = summary["nftables"]["ratio"]
    print(f"goodput under flood / without, median of {args.rounds} rounds:")
    for name, row in summary.items():
        row["vs_nftables"] = round(row["ratio"] / theirs, 2) if theirs else None
        print(f"  {name:16} {row['ratio']:.3f}  ({row['no_flood_gbit_s']:.2f} -> "
              f"{row['flood_gbit_s']:.2f} Gbit/s, {row['flood_kpps']} kpps of spoofed SYNs; "
              f"{row['vs_nftables']}x nftables' ratio)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "seconds": args.seconds,
        "rounds": args.rounds,
        "client": CLIENT_IP,
        "summary": summary,
        "runs": runs,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


def _wait_listening(ns: Netns, port: int) -> None:
    for _ in range(100):
        if f":{port} " in ns.run("ss", "-ltnH").stdout:
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} in {ns.name}")


if __name__ == "__main__":
    main()
