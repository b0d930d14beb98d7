"""The core topology of the integration tests and benchmarks: a client, a firewall
host routing between two veth links, and a VM behind it. Dual stack, the IPv6 side
laid out as the IPv4 one (and as the demo topology's addresses):

    client 192.0.2.10     -- 192.0.2.1     [firewall, router] 10.1.1.254     -- 10.1.1.1     VM
           2001:db8:c::10 -- 2001:db8:c::1                    2001:db8:1::fe -- 2001:db8:1::10

IPv6 addresses are added without duplicate address detection, and the namespaces
neither run DAD nor accept router advertisements, so every address is usable at once
and no router advertisement rewrites the routes.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .netns import SAMIXDP, Lab, Netns

CLIENT_IP = "192.0.2.10"
FW_CLIENT_IP = "192.0.2.1"
VM_IP = "10.1.1.1"
VM_NET = "10.1.1.0/24"
VM_GW_IP = "10.1.1.254"

CLIENT_IP6 = "2001:db8:c::10"
FW_CLIENT_IP6 = "2001:db8:c::1"
VM_IP6 = "2001:db8:1::10"
VM_NET6 = "2001:db8:1::/64"
VM_GW_IP6 = "2001:db8:1::fe"


@dataclass
class CoreTopology:
    lab: Lab
    client: Netns
    fw: Netns
    vm: Netns
    bpffs: Path
    fw_links: tuple[str, str] = ("sxf-cl", "sxf-vm")

    def samixdp(self, *args: str, check: bool = False,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """The real CLI inside the firewall namespace, on this topology's bpffs."""
        return self.fw.run(
            SAMIXDP, *args, check=check, timeout=timeout,
            env={
                "SAMIXDP_BPFFS": str(self.bpffs),
                "SAMIXDP_CONFIG_DIR": str(self.lab.run_dir / "config"),
                "SAMIXDP_STATE_DIR": str(self.lab.run_dir / "state"),
            },
        )

    def samixdp_json(self, *args: str) -> object:
        res = self.samixdp(*args, "--json", check=True)
        return json.loads(res.stdout)


def _quiet_ipv6(ns: Netns) -> None:
    """No DAD and no router advertisements, for the links created after this."""
    for scope in ("all", "default"):
        ns.sysctl(f"net.ipv6.conf.{scope}.accept_dad", 0)
        ns.sysctl(f"net.ipv6.conf.{scope}.accept_ra", 0)


def build_core(lab: Lab) -> CoreTopology:
    client, fw, vm = lab.netns("c"), lab.netns("f"), lab.netns("v")
    for ns in (client, fw, vm):
        _quiet_ipv6(ns)
    lab.veth(client, "sxc-fw", fw, "sxf-cl")
    lab.veth(fw, "sxf-vm", vm, "sxv-fw")
    fw.sysctl("net.ipv4.ip_forward", 1)
    fw.sysctl("net.ipv6.conf.all.forwarding", 1)
    client.ip("addr", "add", f"{CLIENT_IP}/24", "dev", "sxc-fw")
    fw.ip("addr", "add", f"{FW_CLIENT_IP}/24", "dev", "sxf-cl")
    fw.ip("addr", "add", f"{VM_GW_IP}/24", "dev", "sxf-vm")
    vm.ip("addr", "add", f"{VM_IP}/24", "dev", "sxv-fw")
    client.ip("addr", "add", f"{CLIENT_IP6}/64", "dev", "sxc-fw", "nodad")
    fw.ip("addr", "add", f"{FW_CLIENT_IP6}/64", "dev", "sxf-cl", "nodad")
    fw.ip("addr", "add", f"{VM_GW_IP6}/64", "dev", "sxf-vm", "nodad")
    vm.ip("addr", "add", f"{VM_IP6}/64", "dev", "sxv-fw", "nodad")
    for ns, link in ((client, "sxc-fw"), (fw, "sxf-cl"), (fw, "sxf-vm"), (vm, "sxv-fw")):
        ns.ip("link", "set", link, "up")
    client.ip("route", "add", "default", "via", FW_CLIENT_IP)
    vm.ip("route", "add", "default", "via", VM_GW_IP)
    client.ip("-6", "route", "add", "default", "via", FW_CLIENT_IP6)
    vm.ip("-6", "route", "add", "default", "via", VM_GW_IP6)
    return CoreTopology(lab, client, fw, vm, lab.bpffs())
