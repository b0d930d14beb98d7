#!/usr/bin/env bash
# The demo topology of DESIGN section 4, built from network namespaces and veth pairs.
#
#   client --- gateway ---+--- firewall host A ---+
#                         |                       +--- VM 10.1.1.1, 2001:db8:1::10
#                         +--- firewall host B ---+
#
# Dual stack; IPv6 mirrors IPv4 (documentation prefixes, RFC 3849):
#   sxcl  client   sxc-gw 192.0.2.10/24 2001:db8:c::10/64, default via 192.0.2.1, 2001:db8:c::1
#   sxgw  gateway  sxg-cl 192.0.2.1/24 2001:db8:c::1/64, sxg-a 10.9.1.1/24 2001:db8:a::1/64,
#                  sxg-b 10.9.2.1/24 2001:db8:b::1/64; 10.1.1.0/24 and 2001:db8:1::/64 via A
#                  (10.9.1.2, 2001:db8:a::2) or, after move-to-b, via B (10.9.2.2, 2001:db8:b::2)
#   sxfa  host A   sxa-gw 10.9.1.2/24 2001:db8:a::2/64 (uplink),
#                  sxa-vm 10.1.1.254/24 2001:db8:1::fe/64 (VM side), router
#   sxfb  host B   sxb-gw 10.9.2.2/24 2001:db8:b::2/64, sxb-vm as on A, router
#   sxvm  VM       10.1.1.1 and 2001:db8:1::10 on its loopback; uplinks sxv-a (to A), sxv-b (to B)
#
# The VM's addresses live on its loopback (noprefixroute; no dummy driver needed, some
# kernels lack it), so it never changes; exactly one uplink
# is up and carries the VM's routes (default via 10.1.1.254). A and B both own the
# gateway addresses 10.1.1.254 and 2001:db8:1::fe with the same MAC (an anycast gateway,
# as in clouds), so the VM's neighbour entries stay valid when it moves. Duplicate
# address detection is off in every namespace (no address waits 1-2 s as tentative). `move-to-b` brings sxv-b up,
# moves the VM's routes onto it, takes sxv-a down, flips the gateway's route to B and
# announces the VM there (gratuitous ARP and unsolicited NA, scripts/announce.py, as a
# hypervisor does after a live migration):
# the VM keeps its address, MAC and default gateway, so its TCP connections can go on.
#
# `add-vm-addr ADDR` gives the VM namespace another address inside the VM prefix (on
# its loopback, and for IPv6 the hosts' neighbour entries): another VM, as the firewall
# sees VMs (one address each), hosted and moved with the first (a host evacuation).
# `move-to-*` announces every VM address.
#
# Namespace names get $SX_SUFFIX appended (letters/digits, at most 8) so several
# topologies can run side by side. Interface names are the same in every topology:
# each lives only inside its own namespaces (veths are created there directly).
# Each firewall host gets its own bpffs (mounted here, in the root mount namespace, so
# the pins outlive `ip netns exec`), config and state dirs under /run/sx$SX_SUFFIX/.
#
# usage: veth_topology.sh up|down|move-to-b|move-to-a|add-vm-addr ADDR|status|env
set -euo pipefail

SFX=${SX_SUFFIX:-}
if ! [[ $SFX =~ ^[a-z0-9]{0,8}$ ]]; then
    echo "veth_topology: SX_SUFFIX must be 0-8 lowercase letters/digits, got '$SFX'" >&2
    exit 2
fi

NS_CL=sxcl$SFX NS_GW=sxgw$SFX NS_A=sxfa$SFX NS_B=sxfb$SFX NS_VM=sxvm$SFX
ALL_NS=("$NS_CL" "$NS_GW" "$NS_A" "$NS_B" "$NS_VM")
RUN_DIR=/run/sx$SFX

CLIENT_IP=192.0.2.10 GW_CL_IP=192.0.2.1
GW_A_IP=10.9.1.1 A_UP_IP=10.9.1.2
GW_B_IP=10.9.2.1 B_UP_IP=10.9.2.2
VM_IP=10.1.1.1 VM_NET=10.1.1.0/24 VM_GW_IP=10.1.1.254
VM_GW_MAC=02:73:78:01:01:fe VM_MAC=02:73:78:01:01:01
CLIENT_IP6=2001:db8:c::10 GW_CL_IP6=2001:db8:c::1
GW_A_IP6=2001:db8:a::1 A_UP_IP6=2001:db8:a::2
GW_B_IP6=2001:db8:b::1 B_UP_IP6=2001:db8:b::2
VM_IP6=2001:db8:1::10 VM_NET6=2001:db8:1::/64 VM_GW_IP6=2001:db8:1::fe

die() { echo "veth_topology: $*" >&2; exit 1; }
say() { echo "veth_topology[$SFX]: $*"; }
ns_exists() { [[ -e /run/netns/$1 ]]; }

# sysctl without procps: NS KEY VALUE (KEY in dotted form, no dots in interface names)
nsysctl() { ip netns exec "$1" bash -c "echo $3 > /proc/sys/${2//.//}"; }

ns_new() {
    ip netns add "$1"
    ip -n "$1" link set lo up
    nsysctl "$1" net.ipv4.conf.all.rp_filter 0
    nsysctl "$1" net.ipv4.conf.default.rp_filter 0
    nsysctl "$1" net.ipv6.conf.all.accept_dad 0
    nsysctl "$1" net.ipv6.conf.default.accept_dad 0
    nsysctl "$1" net.ipv6.conf.all.accept_ra 0
    nsysctl "$1" net.ipv6.conf.default.accept_ra 0
}

# veth NS_A NAME_A NS_B NAME_B: a pair created directly inside the namespaces
veth() {
    ip -n "$1" link add "$2" type veth peer name "$4" netns "$3"
    nsysctl "$1" "net.ipv4.conf.$2.rp_filter" 0
    nsysctl "$3" "net.ipv4.conf.$4.rp_filter" 0
}

require_root() { [[ $(id -u) == 0 ]] || die "needs root (network namespaces, bpffs mounts)"; }

cmd_up() {
    require_root
    local ns
    for ns in "${ALL_NS[@]}"; do
        ns_exists "$ns" && die "namespace $ns exists already: run '$0 down' first"
    done
    trap 'echo "veth_topology: up failed, removing what was built" >&2; cmd_down >/dev/null 2>&1' ERR
    trap 'cmd_down >/dev/null 2>&1; exit 130' INT TERM

    for ns in "${ALL_NS[@]}"; do ns_new "$ns"; done
    for ns in "$NS_GW" "$NS_A" "$NS_B"; do
        nsysctl "$ns" net.ipv4.ip_forward 1
        nsysctl "$ns" net.ipv6.conf.all.forwarding 1
    done

    veth "$NS_CL" sxc-gw "$NS_GW" sxg-cl
    veth "$NS_GW" sxg-a "$NS_A" sxa-gw
    veth "$NS_GW" sxg-b "$NS_B" sxb-gw
    veth "$NS_A" sxa-vm "$NS_VM" sxv-a
    veth "$NS_B" sxb-vm "$NS_VM" sxv-b

    # client
    ip -n "$NS_CL" addr add "$CLIENT_IP/24" dev sxc-gw
    ip -n "$NS_CL" link set sxc-gw up
    ip -n "$NS_CL" route add default via "$GW_CL_IP"
    ip -n "$NS_CL" addr add "$CLIENT_IP6/64" dev sxc-gw nodad
    ip -n "$NS_CL" -6 route add default via "$GW_CL_IP6"

    # gateway
    ip -n "$NS_GW" addr add "$GW_CL_IP/24" dev sxg-cl
    ip -n "$NS_GW" addr add "$GW_A_IP/24" dev sxg-a
    ip -n "$NS_GW" addr add "$GW_B_IP/24" dev sxg-b
    ip -n "$NS_GW" link set sxg-cl up
    ip -n "$NS_GW" link set sxg-a up
    ip -n "$NS_GW" link set sxg-b up
    ip -n "$NS_GW" route add "$VM_NET" via "$A_UP_IP"
    ip -n "$NS_GW" addr add "$GW_CL_IP6/64" dev sxg-cl nodad
    ip -n "$NS_GW" addr add "$GW_A_IP6/64" dev sxg-a nodad
    ip -n "$NS_GW" addr add "$GW_B_IP6/64" dev sxg-b nodad
    ip -n "$NS_GW" -6 route add "$VM_NET6" via "$A_UP_IP6"

    # firewall hosts: uplink to the gateway, VM side owns the anycast gateway address
    ip -n "$NS_A" addr add "$A_UP_IP/24" dev sxa-gw
    ip -n "$NS_B" addr add "$B_UP_IP/24" dev sxb-gw
    ip -n "$NS_A" link set sxa-vm address "$VM_GW_MAC"
    ip -n "$NS_B" link set sxb-vm address "$VM_GW_MAC"
    ip -n "$NS_A" addr add "$VM_GW_IP/24" dev sxa-vm
    ip -n "$NS_B" addr add "$VM_GW_IP/24" dev sxb-vm
    ip -n "$NS_A" addr add "$A_UP_IP6/64" dev sxa-gw nodad
    ip -n "$NS_B" addr add "$B_UP_IP6/64" dev sxb-gw nodad
    ip -n "$NS_A" addr add "$VM_GW_IP6/64" dev sxa-vm nodad
    ip -n "$NS_B" addr add "$VM_GW_IP6/64" dev sxb-vm nodad
    for l in sxa-gw sxa-vm; do ip -n "$NS_A" link set "$l" up; done
    for l in sxb-gw sxb-vm; do ip -n "$NS_B" link set "$l" up; done
    ip -n "$NS_A" route add default via "$GW_A_IP"
    ip -n "$NS_B" route add default via "$GW_B_IP"
    ip -n "$NS_A" -6 route add default via "$GW_A_IP6"
    ip -n "$NS_B" -6 route add default via "$GW_B_IP6"
    # Linux answers neighbour solicitations only for addresses on the asking link, and
    # the VM's address is on its loopback: the hosts know its MAC, as a cloud fabric
    # does (the VM still resolves its gateway by NDP, through the firewall)
    ip -n "$NS_A" -6 neigh replace "$VM_IP6" lladdr "$VM_MAC" dev sxa-vm nud permanent
    ip -n "$NS_B" -6 neigh replace "$VM_IP6" lladdr "$VM_MAC" dev sxb-vm nud permanent

    # VM: the address on lo, both uplinks share the VM's MAC, only sxv-a is up
    ip -n "$NS_VM" addr add "$VM_IP/24" dev lo noprefixroute
    ip -n "$NS_VM" addr add "$VM_IP6/128" dev lo nodad
    ip -n "$NS_VM" link set sxv-a address "$VM_MAC"
    ip -n "$NS_VM" link set sxv-b address "$VM_MAC"
    ip -n "$NS_VM" link set sxv-a up
    vm_routes sxv-a

    local h d
    for h in a b; do
        for d in bpf config state; do mkdir -p "$RUN_DIR/$h/$d"; done
        mountpoint -q "$RUN_DIR/$h/bpf" || mount -t bpf bpf "$RUN_DIR/$h/bpf"
    done
    trap - ERR INT TERM
    say "up: VM $VM_IP $VM_IP6 behind A ($NS_A), client $CLIENT_IP $CLIENT_IP6 in $NS_CL; state under $RUN_DIR"
}

vm_routes() {
    ip -n "$NS_VM" route replace "$VM_NET" dev "$1" src "$VM_IP"
    ip -n "$NS_VM" route replace default via "$VM_GW_IP" dev "$1" src "$VM_IP"
    ip -n "$NS_VM" -6 route replace "$VM_NET6" dev "$1" src "$VM_IP6"
    ip -n "$NS_VM" -6 route replace default via "$VM_GW_IP6" dev "$1" src "$VM_IP6"
}

# the VM's addresses: those on its loopback, but the loopback's own
vm_addrs() {
    ip -n "$NS_VM" -o addr show dev lo | awk '{print $4}' | cut -d/ -f1 | grep -v -e '^127\.' -e '^::1$'
}

cmd_add_vm_addr() {
    require_root
    local addr=${1:-}
    ns_exists "$NS_VM" || die "no topology (missing $NS_VM): run '$0 up'"
    case $addr in
        10.1.1.*)
            ip -n "$NS_VM" addr add "$addr/32" dev lo ;;
        2001:db8:1::*)
            ip -n "$NS_VM" addr add "$addr/128" dev lo nodad
            ip -n "$NS_A" -6 neigh replace "$addr" lladdr "$VM_MAC" dev sxa-vm nud permanent
            ip -n "$NS_B" -6 neigh replace "$addr" lladdr "$VM_MAC" dev sxb-vm nud permanent ;;
        *) die "add-vm-addr: want an address in $VM_NET or $VM_NET6, got '$addr'" ;;
    esac
    say "VM address $addr added"
}

# move TO_LINK FROM_LINK TO_UPLINK_IP TO_UPLINK_IP6 NAME
move() {
    require_root
    for ns in "$NS_VM" "$NS_GW"; do ns_exists "$ns" || die "no topology (missing $ns): run '$0 up'"; done
    ip -n "$NS_VM" link set "$1" up
    vm_routes "$1"
    ip -n "$NS_VM" link set "$2" down
    ip -n "$NS_GW" route replace "$VM_NET" via "$3"
    ip -n "$NS_GW" -6 route replace "$VM_NET6" via "$4"
    # as a hypervisor announces a moved VM: a gratuitous ARP and an unsolicited NA
    # shellcheck disable=SC2046
    ip netns exec "$NS_VM" python3 "$(dirname "$0")/announce.py" "$1" $(vm_addrs) >/dev/null
    say "VM $(vm_addrs | tr '\n' ' ')now behind $5 (uplink $1, gateway routes $VM_NET via $3, $VM_NET6 via $4)"
}

kill_ns_pids() {
    local ns=$1 pids
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [[ -n $pids ]] || return 0
    # shellcheck disable=SC2086
    kill $pids 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [[ -n $pids ]] || return 0
        sleep 0.1
    done
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
}

cmd_down() {
    require_root
    local ns removed=0 h
    for ns in "${ALL_NS[@]}"; do
        if ns_exists "$ns"; then
            kill_ns_pids "$ns"
            ip netns del "$ns" && removed=$((removed + 1))
        fi
    done
    # deleting the namespaces deleted the veths and with them any XDP attachment;
    # unmounting the bpffs drops the pins, which frees the program and maps
    for h in a b; do
        if mountpoint -q "$RUN_DIR/$h/bpf" 2>/dev/null; then umount -l "$RUN_DIR/$h/bpf"; fi
    done
    rm -rf "$RUN_DIR"
    say "down: removed $removed namespaces and $RUN_DIR"
}

cmd_status() {
    local ns missing=0
    for ns in "${ALL_NS[@]}"; do ns_exists "$ns" || missing=$((missing + 1)); done
    if ((missing == ${#ALL_NS[@]})); then say "down"; return 0; fi
    if ((missing > 0)); then say "PARTIAL: $missing of ${#ALL_NS[@]} namespaces missing"; fi
    local up="none" link
    if ns_exists "$NS_VM"; then
        for link in sxv-a sxv-b; do
            if [[ $(ip -n "$NS_VM" -o link show "$link" 2>/dev/null) =~ \<[A-Z_,]*,UP[,\>] ]]; then
                if [[ $link == sxv-a ]]; then up="A ($link)"; else up="B ($link)"; fi
            fi
        done
    fi
    say "VM $VM_IP uplink: $up"
    if ns_exists "$NS_GW"; then
        say "gateway: $(ip -n "$NS_GW" route show "$VM_NET")"
        say "gateway: $(ip -n "$NS_GW" -6 route show "$VM_NET6")"
    fi
    local h n line addr mode pid xdp
    for h in A B; do
        n=$NS_A
        if [[ $h == B ]]; then n=$NS_B; fi
        ns_exists "$n" || continue
        for link in $(ip -n "$n" -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep '^sx'); do
            line=$(ip -n "$n" -o link show "$link")
            addr=$(ip -n "$n" -o -4 addr show "$link" | awk '{print $4}' | head -n1)
            mode="" pid="" xdp=""
            if [[ $line =~ \ (xdp[a-z]*)\  ]]; then mode=${BASH_REMATCH[1]}; fi
            if [[ $line =~ prog/xdp\ id\ ([0-9]+) ]]; then pid=${BASH_REMATCH[1]}; fi
            if [[ -n $pid ]]; then xdp="  [$mode prog $pid]"; fi
            say "host $h $link: $addr$xdp"
        done
    done
}

cmd_env() {
    cat <<EOF
SX_SUFFIX='$SFX'
SX_NS_CLIENT='$NS_CL'
SX_NS_GW='$NS_GW'
SX_NS_A='$NS_A'
SX_NS_B='$NS_B'
SX_NS_VM='$NS_VM'
SX_CLIENT_IP='$CLIENT_IP'
SX_VM_IP='$VM_IP'
SX_VM_NET='$VM_NET'
SX_VM_GW_IP='$VM_GW_IP'
SX_CLIENT_IP6='$CLIENT_IP6'
SX_VM_IP6='$VM_IP6'
SX_VM_NET6='$VM_NET6'
SX_VM_GW_IP6='$VM_GW_IP6'
SX_GW_CLIENT_IP6='$GW_CL_IP6'
SX_A_UPLINK_IP6='$A_UP_IP6'
SX_B_UPLINK_IP6='$B_UP_IP6'
SX_A_UPLINK_IP='$A_UP_IP'
SX_B_UPLINK_IP='$B_UP_IP'
SX_A_IFACES='sxa-gw sxa-vm'
SX_B_IFACES='sxb-gw sxb-vm'
SX_A_BPFFS='$RUN_DIR/a/bpf'
SX_A_CONFIG_DIR='$RUN_DIR/a/config'
SX_A_STATE_DIR='$RUN_DIR/a/state'
SX_B_BPFFS='$RUN_DIR/b/bpf'
SX_B_CONFIG_DIR='$RUN_DIR/b/config'
SX_B_STATE_DIR='$RUN_DIR/b/state'
SX_RUN_DIR='$RUN_DIR'
EOF
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    move-to-b) move sxv-b sxv-a "$B_UP_IP" "$B_UP_IP6" "B ($NS_B)" ;;
    move-to-a) move sxv-a sxv-b "$A_UP_IP" "$A_UP_IP6" "A ($NS_A)" ;;
    add-vm-addr) cmd_add_vm_addr "${2:-}" ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *)
        echo "usage: $0 up|down|move-to-b|move-to-a|add-vm-addr ADDR|status|env   (env SX_SUFFIX=... for a second topology)" >&2
        exit 2
        ;;
esac
