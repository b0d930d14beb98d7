"""A bundle's records as an operator reads them (`bundle inspect --records`):
addresses in canonical form (IPv6 compressed, IPv4 dotted), an IPv6 SYN or ban
source as its /64, ports in host order, states, protocols and actions by name."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..base.layout import Layout
from ..base.netutil import addrs_to_ips, is_ipv4_addr
from .vmset import source_text
from .wire import ACL_WF_WAS_IFACE_BOUND, decode_counter16

Row = dict[str, Any]


def _port(values: np.ndarray) -> list[int]:
    return [int(p) for p in np.asarray(values, dtype=np.uint16).byteswap()]


def _proto_names(layout: Layout) -> dict[int, str]:
    return {v: n.lower() for v, n in layout.names("PROTO_").items()}


def session_rows(rec: np.ndarray, layout: Layout, deleted: bool = False) -> list[Row]:
    """src is the initiator (deleted-session keys: the lower end)."""
    protos = _proto_names(layout)
    states = layout.names("ST_")
    icmp = (layout.const("PROTO_ICMP"), layout.const("PROTO_ICMPV6"))
    side_hi = layout.const("SIDE_HI")
    lo, hi = addrs_to_ips(rec["addr_lo"]), addrs_to_ips(rec["addr_hi"])
    plo, phi = _port(rec["port_lo"]), _port(rec["port_hi"])
    out = []
    for i in range(len(rec)):
        proto = int(rec["proto"][i])
        init_hi = not deleted and int(rec["initiator"][i]) == side_hi
        src, dst = (hi[i], lo[i]) if init_hi else (lo[i], hi[i])
        sport, dport = (phi[i], plo[i]) if init_hi else (plo[i], phi[i])
        if proto in icmp:  # echo: the identifier, no ports
            sport, dport = plo[i], 0
        row: Row = {"proto": protos.get(proto, str(proto)), "src": src, "sport": sport,
                    "dst": dst, "dport": dport}
        if not deleted:
            pk = decode_counter16(rec["packets"][i])
            by = decode_counter16(rec["bytes"][i])
            row.update(
                state=states.get(int(rec["state"][i]), str(int(rec["state"][i]))),
                created_age_ms=int(rec["created_age_ms"][i]),
                idle_age_ms=int(rec["idle_age_ms"][i]),
                packets=int(pk.sum()),
                bytes=int(by.sum()),
            )
        out.append(row)
    return out


def syn_rows(rec: np.ndarray, deleted: bool = False) -> list[Row]:
    src, dst = source_text(rec["src"]), addrs_to_ips(rec["dst"])
    out: list[Row] = []
    for i in range(len(rec)):
        row: Row = {"src": src[i], "vm": dst[i]}
        if not deleted:
            row.update(count=int(rec["count"][i]), total=int(rec["total"][i]),
                       window_age_ms=int(rec["window_age_ms"][i]))
        out.append(row)
    return out


def ban_rows(rec: np.ndarray, deleted: bool = False) -> list[Row]:
    src, vm = source_text(rec["src"]), addrs_to_ips(rec["vm"])
    out: list[Row] = []
    for i in range(len(rec)):
        row: Row = {"src": src[i], "vm": vm[i]}
        if not deleted:
            row.update(remaining_ms=int(rec["remaining_ms"][i]),
                       banned_age_ms=int(rec["banned_age_ms"][i]),
                       dropped=int(rec["dropped"][i]))
        out.append(row)
    return out


def acl_rows(rec: np.ndarray, layout: Layout) -> list[Row]:
    protos = {**_proto_names(layout), layout.const("ACL_PROTO_ANY"): "any"}
    actions = {layout.const("ACL_ACT_ALLOW"): "allow", layout.const("ACL_ACT_DENY"): "deny"}
    vm, src = addrs_to_ips(rec["vm"]), addrs_to_ips(rec["src_addr"])
    v4 = is_ipv4_addr(rec["src_addr"]).tolist()
    mapped = layout.const("IPV4_MAPPED_PLEN")
    out: list[Row] = []
    for i in range(len(rec)):
        plen = int(rec["src_plen"][i])
        source = "any" if plen == 0 else f"{src[i]}/{plen - mapped if v4[i] else plen}"
        lo, hi = int(rec["dport_lo"][i]), int(rec["dport_hi"][i])
        out.append({
            "vm": vm[i],
            "priority": int(rec["priority"][i]),
            "action": actions.get(int(rec["action"][i]), str(int(rec["action"][i]))),
            "proto": protos.get(int(rec["proto"][i]), str(int(rec["proto"][i]))),
            "dport": "any" if (lo, hi) == (0, 65535) else (str(lo) if lo == hi else f"{lo}-{hi}"),
            "src": source,
            "vlan": int(rec["vlan"][i]) or None,
            "was_iface_bound": bool(int(rec["flags"][i]) & ACL_WF_WAS_IFACE_BOUND),
            "hits": int(rec["hits"][i]),
        })
    return out


def bundle_records(sections: dict[str, np.ndarray | bytes], layout: Layout) -> dict[str, Any]:
    """Every record of every section, readable (an ACL blob as its length)."""
    out: dict[str, Any] = {}
    for name, value in sections.items():
        if not len(value):
            continue
        if isinstance(value, bytes):
            out[name] = {"blob_bytes": len(value)}
        elif name == "sessions":
            out[name] = session_rows(value, layout)
        elif name == "del_sessions":
            out[name] = session_rows(value, layout, deleted=True)
        elif name in ("syn", "del_syn"):
            out[name] = syn_rows(value, deleted=name == "del_syn")
        elif name in ("blacklist", "del_blacklist"):
            out[name] = ban_rows(value, deleted=name == "del_blacklist")
        elif name == "acl":
            out[name] = acl_rows(value, layout)
    return out


def record_lines(records: dict[str, Any]) -> list[str]:
    """One line per record, for the terminal."""
    lines = []
    for name, rows in records.items():
        if isinstance(rows, dict):
            lines.append(f"{name}: opaque blob of {rows['blob_bytes']} bytes")
            continue
        for r in rows:
            if name in ("sessions", "del_sessions"):
                text = f"{r['proto']} {_end(r['src'], r['sport'])} -> {_end(r['dst'], r['dport'])}"
                if "state" in r:
                    text += (f" {r['state']} idle {r['idle_age_ms']} ms, {r['packets']} packets"
                             f" {r['bytes']} bytes")
            elif name == "acl":
                text = (f"vm {r['vm']} priority {r['priority']} {r['action']} {r['proto']} "
                        f"dport {r['dport']} src {r['src']}"
                        + (f" vlan {r['vlan']}" if r["vlan"] else "") + f" hits {r['hits']}")
            else:
                text = " ".join(f"{k} {v}" for k, v in r.items())
            lines.append(f"{name}: {text}")
    return lines


def _end(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
