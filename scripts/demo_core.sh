#!/usr/bin/env bash
# `make demo` until migration exists: the stateful firewall on host A of the demo
# topology (scripts/veth_topology.sh) lets the VM's outbound TCP connection through and
# drops an unsolicited inbound one. Exits 0 only if both happened as expected.
# Everything it builds is removed on exit, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

export SX_SUFFIX=${SX_SUFFIX:-d$$}
TOPO=(bash "$ROOT/scripts/veth_topology.sh")
PY=$ROOT/.venv/bin/python
SAMIXDP=$ROOT/.venv/bin/samixdp
PROBE=$ROOT/scripts/tcp_probe.py
OUT_PORT=8080 IN_PORT=2222

step() { printf '\n==> %s\n' "$*"; }
fail() { printf '\nDEMO FAILED: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || fail "needs root: run 'sudo make demo'"
[[ -x $SAMIXDP ]] || fail "$SAMIXDP missing: run 'sudo make setup'"

BG_PIDS=()
TOPO_UP=0
exec 3>&1 4>&2  # the terminal, for a cleanup that runs inside a redirected command
cleanup() {
    local rc=$?
    set +e
    exec 1>&3 2>&4
    for pid in "${BG_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${BG_PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    if ((TOPO_UP)); then
        step "teardown"
        "${TOPO[@]}" down
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "build the topology (client, gateway, firewall hosts A and B, VM 10.1.1.1 behind A)"
"${TOPO[@]}" up  # cleans up after itself if it fails
TOPO_UP=1
eval "$("${TOPO[@]}" env)"
WORK=$SX_RUN_DIR/demo
mkdir -p "$WORK"

# the CLI of host A, run inside A's namespace on A's own bpffs
fw_a() {
    ip netns exec "$SX_NS_A" "$SAMIXDP" --bpffs "$SX_A_BPFFS" \
        --config-dir "$SX_A_CONFIG_DIR" --state-dir "$SX_A_STATE_DIR" "$@"
}
# PROBE NS ARGS...: the bounded TCP echo tool inside a namespace
probe() { local ns=$1; shift; ip netns exec "$ns" timeout 90 "$PY" "$PROBE" "$@"; }
wait_for() {  # FILE PATTERN SECONDS
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        if grep -q "$2" "$1" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

step "attach sami-xdp on host A: uplink sxa-gw and VM side sxa-vm, protecting $SX_VM_NET"
for link in $SX_A_IFACES; do
    fw_a attach "$link" --protect "$SX_VM_NET" --mode auto
done
fw_a status

step "outbound: the VM connects to a server in the client namespace ($SX_CLIENT_IP:$OUT_PORT)"
probe "$SX_NS_CLIENT" serve "$SX_CLIENT_IP" "$OUT_PORT" --lifetime 60 >"$WORK/server-out.log" 2>&1 &
BG_PIDS+=($!)
wait_for "$WORK/server-out.log" listening 5 || fail "server in $SX_NS_CLIENT did not start"
probe "$SX_NS_VM" connect "$SX_CLIENT_IP" "$OUT_PORT" --timeout 2 \
    --message "hello from the VM" --hold-file "$WORK/release" --hold-max 60 \
    --after-hold "still here" >"$WORK/client-out.log" 2>&1 &
CLIENT_PID=$!
BG_PIDS+=("$CLIENT_PID")
if ! wait_for "$WORK/client-out.log" '^ok ' 5; then
    cat "$WORK/client-out.log"
    fail "the VM's outbound connection did not work"
fi
echo "VM: $(head -n1 "$WORK/client-out.log")"

step "samixdp sessions on host A (the connection is still open)"
fw_a sessions
fw_a sessions --json >"$WORK/sessions.json"
"$PY" - "$WORK/sessions.json" "$SX_VM_IP" "$SX_CLIENT_IP" "$OUT_PORT" <<'EOF' || fail "no ESTABLISHED session VM -> client in samixdp sessions --json"
import json, sys
rows = json.load(open(sys.argv[1]))
vm, client, port = sys.argv[2], sys.argv[3], int(sys.argv[4])
ok = [r for r in rows if r["proto"] == "tcp" and r["src"] == vm and r["dst"] == client
      and r["dport"] == port and r["state"] == "ESTABLISHED"]
sys.exit(0 if ok else 1)
EOF
echo "check: session tcp $SX_VM_IP -> $SX_CLIENT_IP:$OUT_PORT is ESTABLISHED"

step "inbound: the client tries an unsolicited connection to the VM ($SX_VM_IP:$IN_PORT)"
probe "$SX_NS_VM" serve "$SX_VM_IP" "$IN_PORT" --lifetime 60 >"$WORK/server-in.log" 2>&1 &
BG_PIDS+=($!)
wait_for "$WORK/server-in.log" listening 5 || fail "server in $SX_NS_VM did not start"
echo "(a server is listening on $SX_VM_IP:$IN_PORT inside the VM)"
if probe "$SX_NS_CLIENT" connect "$SX_VM_IP" "$IN_PORT" --timeout 2 >"$WORK/client-in.log" 2>&1; then
    cat "$WORK/client-in.log"
    fail "the unsolicited inbound connection got through"
fi
echo "client: $(cat "$WORK/client-in.log")"

step "samixdp stats on host A"
fw_a stats
DROPS=$(fw_a stats --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["drop-acl-default"])')
((DROPS > 0)) || fail "drop-acl-default is $DROPS, expected > 0"
echo "check: drop-acl-default = $DROPS"

step "the VM's connection still carries data"
touch "$WORK/release"
wait "$CLIENT_PID" || { cat "$WORK/client-out.log"; fail "the VM's connection broke"; }
echo "VM: $(tail -n1 "$WORK/client-out.log")"

step "result"
echo "PASS: outbound VM -> client connection allowed and tracked as ESTABLISHED;"
echo "      unsolicited client -> VM connection dropped (drop-acl-default = $DROPS)"
