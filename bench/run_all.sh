#!/usr/bin/env bash
# `sudo make bench`: every benchmark of issue 5, one after the other (never two at
# once: they share two CPUs, and the conntrack table is shared by all namespaces).
# Each writes bench/results/<name>.json (and PNGs); bench/summary.py then prints the
# table that README.md quotes. Bounded: each step has its own packet/second limits
# and a timeout here. On a 2-core VM: P1 under a minute, P2/P3 about 6 minutes, P4/P5
# about 5 minutes, the host drain 3 minutes, TCP goodput about 8 minutes, the flood
# goodput, P6 and agent abuse steps a few minutes more.
# IPv4 and IPv6 run side by side within each step (P1 and P2/P3 per family, nftables
# as one `inet` table; migration with all-IPv4 and half-IPv6 sessions).
#   BENCH_QUICK=1  shorter runs (smaller sizes), for a smoke test
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
QUICK=()
[[ ${BENCH_QUICK:-0} == 1 ]] && QUICK=(--quick)
[[ $(id -u) == 0 ]] || { echo "bench: needs root (sudo make bench)" >&2; exit 1; }

step() { printf '\n===== %s =====\n' "$*"; }
start=$(date +%s)

step "P1 per-packet cost (PROG_TEST_RUN), IPv4 and IPv6"
timeout 600 "$PY" bench/prog_cost.py "${QUICK[@]}"

step "ACL cost with other VMs' rules loaded"
timeout 300 "$PY" bench/acl_cost.py

step "P2/P3 packet rates on veth, IPv4 and IPv6 (ours vs nftables inet vs XDP_DROP / no filter)"
timeout 900 "$PY" bench/veth_rates.py "${QUICK[@]}"

step "TCP goodput through the firewall host: no filter / nftables / ours native, generic, tc, auto; 1 and 8 streams, both directions"
timeout 1200 "$PY" bench/goodput.py "${QUICK[@]}"

step "established TCP goodput during a spoofed SYN flood (ours vs nftables)"
rounds=3
[[ ${BENCH_QUICK:-0} == 1 ]] && rounds=1
timeout 600 "$PY" bench/flood_goodput.py --rounds "$rounds"

step "P4/P5 migration speed and bundle size (all IPv4, half IPv6), map memory"
timeout 900 "$PY" bench/migrate_speed.py "${QUICK[@]}"

step "migration phases with the dirty-state log: 0% and 1% changed, the CLI's wall time"
timeout 900 "$PY" bench/migrate_phases.py "${QUICK[@]}"

step "host drain through the agents: 1 x 200k, 20 x 10k, 50 x 4k sessions (and 20 migrate processes)"
timeout 600 "$PY" bench/drain.py "${QUICK[@]}"

step "P6 survival at scale: the demo with 1,000 connections"
conns=1000
[[ ${BENCH_QUICK:-0} == 1 ]] && conns=200
out=$(mktemp -d /tmp/samixdp-survival.XXXXXX)
timeout 600 "$PY" scripts/demo_migrate.py --conns "$conns" --out "$out"
cp "$out/demo.json" bench/results/survival_${conns}.json
cp "$out/timeline.png" bench/results/survival_${conns}.png
rm -rf "$out"

step "what an attacker costs the agent (unauthenticated frames, slow clients, zlib bombs)"
timeout 300 "$PY" bench/agent_abuse.py "${QUICK[@]}" > /dev/null

step "summary"
"$PY" bench/summary.py
echo "bench: done in $(( $(date +%s) - start )) s"
