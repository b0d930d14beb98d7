"""IPv6 through the real command line (issue 12 items 2 and 4): `protect`, `attach
--protect`, `acl add/list`, `blacklist add/list/del`, `sessions [--vm]` and `stats`
accept IPv6 and print every address in its canonical compressed form, in text and
JSON; a rule mixing families is refused with one line on stderr and a non-zero exit,
changing nothing. The real entry point (`sami_xdp.cli.main`) runs in-process against
the test firewall; packets go through the real program (PROG_TEST_RUN)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_datapath import run

from sami_xdp.cli import main
from sami_xdp.loader.pinned import Firewall
from sami_xdp.policy import protect
from testbed import packets as P

pytestmark = pytest.mark.needs_root

NET6, NET4 = "2001:db8:1::/64", "10.1.1.0/24"
VM6, VM4 = "2001:db8:1::10", "10.1.1.1"
CLIENT6, CLIENT6_SAME64 = "2001:db8:99:1::5", "2001:db8:99:1::77"  # one /64
CLIENT6_OTHER64 = "2001:db8:99:2::5"
USAGE = 2  # InvalidArgument's exit code (README "Exit codes")


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Cli:
    fw: Firewall
    config: Path
    state: Path

    def __call__(self, *args: str) -> Result:
        """`samixdp ARGS` through the real main(), in-process."""
        argv = ["samixdp", "--bpffs", str(self.fw.path), "--config-dir", str(self.config),
                "--state-dir", str(self.state), *args]
        out, err = io.StringIO(), io.StringIO()
        old = sys.argv
        sys.argv = argv
        code = 0
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.argv = old
        return Result(code, out.getvalue(), err.getvalue())

    def ok(self, *args: str) -> str:
        res = self(*args)
        assert res.code == 0, f"{args} -> {res.code} {res.err!r}"
        return res.out

    def json(self, *args: str) -> object:
        return json.loads(self.ok(*args, "--json"))

    def refused(self, *args: str, mentions: str) -> str:
        """One `samixdp: error:` line, exit code 2, no traceback, maps unchanged."""
        before = _maps(self.fw)
        res = self(*args)
        shown = f"{args} -> {res.code} {res.err!r}"
        assert res.code == USAGE, shown
        lines = res.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("samixdp: error: "), shown
        assert mentions in lines[0], shown
        assert "Traceback" not in res.err + res.out, shown
        assert _maps(self.fw) == before, f"{shown}: something changed"
        return lines[0]


def _maps(fw: Firewall) -> dict[str, list[str]]:
    out = {}
    for name in ("sessions", "unassured", "blacklist", "acl_rules", "syn_counters"):
        k, v = fw.maps[name].dump()
        out[name] = sorted(a.tobytes().hex() + b.tobytes().hex() for a, b in zip(k, v, strict=True))
    out["protected"] = sorted(str(n) for n in protect.list_protected(fw))
    return out


@pytest.fixture
def cli(fw: Firewall, tmp_path: Path) -> Cli:
    return Cli(fw, tmp_path / "cfg", tmp_path / "state")


@pytest.fixture
def pcli(cli: Cli) -> Cli:
    cli.ok("protect", NET6)
    cli.ok("protect", NET4)
    return cli


# ---- protected prefixes ---------------------------------------------------------------


def test_protect_add_list_remove_ipv6(cli):
    assert cli.ok("protect", "2001:DB8:1:0:0::/64").strip() == f"protecting {NET6}"
    cli.ok("protect", NET4)
    assert cli.json("status")["protected"] == [NET4, NET6]
    assert f"protected: {NET4}, {NET6}" in cli.ok("status")
    assert cli.ok("protect", "2001:db8:1::/64", "--remove").strip() == \
        f"no longer protecting {NET6}"
    assert cli.json("status")["protected"] == [NET4]
    cli.refused("protect", NET6, "--remove", mentions=f"{NET6} is not protected")
    cli.refused("protect", "::/0", mentions="IPv4-mapped space")
    cli.refused("protect", "2001:db8::/129", mentions="not an IP prefix")


@pytest.fixture
def veth() -> Iterator[str]:
    name = f"sxv6{os.getpid() % 100000}"
    subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"],
                   check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


def test_attach_protects_ipv6_prefixes(cli, veth):
    out = cli.ok("attach", veth, "--protect", "2001:db8:1::/64", "--protect", NET4,
                 "--mode", "generic")
    assert f"attached to {veth} in generic mode" in out
    try:
        st = cli.json("status")
        assert st["protected"] == [NET4, NET6]
        assert [i["ifindex"] for i in st["interfaces"]] == [socket.if_nametoindex(veth)]
    finally:
        cli.ok("detach", veth)


# ---- ACL ------------------------------------------------------------------------------


def test_acl_add_and_list_ipv6_in_canonical_form(pcli):
    rid = pcli.ok("acl", "add", "--vm", "2001:DB8:1:0::10", "--src", "2001:0db8:0099::/48",
                  "--proto", "tcp", "--dport", "22").strip()
    icmp = pcli.ok("acl", "add", "--vm", NET6, "--proto", "icmpv6").strip()
    pcli.ok("acl", "add", "--vm", VM4, "--proto", "udp", "--dport", "53")
    rows = pcli.json("acl", "list")
    assert [(str(r["id"]), r["vm"], r["proto"], r["dport"], r["src"]) for r in rows][:2] == [
        (rid, VM6, "tcp", "22", "2001:db8:99::/48"), (icmp, NET6, "icmpv6", "any", "::/0")]
    assert rows[2]["vm"] == VM4 and rows[2]["src"] == "0.0.0.0/0"
    mine = pcli.json("acl", "list", "--vm", "2001:db8:1:0:0:0:0:10")
    assert [r["id"] for r in mine] == [int(rid)]
    text = pcli.ok("acl", "list", "--vm", VM6)
    assert f" {VM6} " in text and " 2001:db8:99::/48 " in text
    # the rule works on the real program
    assert run(pcli.fw, P.tcp6(CLIENT6, 1000, VM6, 22, P.SYN)) == "pass-acl"
    assert run(pcli.fw, P.tcp6("2001:db8:98::5", 1000, VM6, 22, P.SYN)) == "drop-acl-default"
    assert [r["hits"] for r in pcli.json("acl", "list", "--vm", VM6)] == [1]


def test_a_mixed_family_rule_is_refused_in_one_line(pcli):
    line = pcli.refused("acl", "add", "--vm", VM6, "--src", "192.0.2.0/24", "--proto", "tcp",
                        mentions="must be of one family")
    assert "192.0.2.0/24 is IPv4" in line and "is IPv6" in line
    pcli.refused("acl", "add", "--vm", VM4, "--src", "2001:db8:99::/48",
                 mentions="must be of one family")
    pcli.refused("acl", "add", "--vm", NET4, "--src", "::/0", mentions="must be of one family")
    pcli.refused("acl", "add", "--vm", VM4, "--proto", "icmpv6", mentions="use icmp")
    pcli.refused("acl", "add", "--vm", VM6, "--proto", "icmp", mentions="use icmpv6")
    assert pcli.json("acl", "list") == []


def test_acl_load_of_a_mixed_family_file_changes_nothing(pcli, tmp_path):
    pcli.ok("acl", "add", "--vm", VM6, "--proto", "udp")
    f = tmp_path / "rules.toml"
    f.write_text(f'[[rules]]\nvm = "{VM6}"\nproto = "tcp"\n'
                 f'[[rules]]\nvm = "{VM6}"\nsrc = "198.51.100.0/24"\n')
    pcli.refused("acl", "load", str(f), mentions="rule 2: source 198.51.100.0/24 is IPv4")
    f.write_text(f'[[rules]]\nvm = "{VM6}"\nproto = "tcp"\nsrc = "2001:db8:99::/48"\n')
    assert "loaded 1 rules" in pcli.ok("acl", "load", str(f))
    assert [r["src"] for r in pcli.json("acl", "list")] == ["2001:db8:99::/48"]


# ---- sessions ---------------------------------------------------------------------------


def test_sessions_of_an_ipv6_vm_in_text_and_json(pcli):
    pcli.ok("acl", "add", "--vm", VM6, "--proto", "tcp", "--dport", "22")
    assert run(pcli.fw, P.tcp6(CLIENT6, 1000, VM6, 22, P.SYN)) == "pass-acl"
    assert run(pcli.fw, P.tcp6(VM6, 22, CLIENT6, 1000, P.SYN | P.ACK)) == "pass-session"
    assert run(pcli.fw, P.tcp(VM4, 40000, "192.0.2.10", 80, P.SYN)) == "pass-outbound"
    rows = pcli.json("sessions")
    assert sorted((r["proto"], r["src"], r["sport"], r["dst"], r["dport"]) for r in rows) == [
        ("tcp", VM4, 40000, "192.0.2.10", 80), ("tcp", CLIENT6, 1000, VM6, 22)]
    for vm in (VM6, "2001:DB8:1:0:0:0:0:10"):
        (row,) = pcli.json("sessions", "--vm", vm)
        assert (row["src"], row["dst"], row["state"]) == (CLIENT6, VM6, "SYN_RECV")
    text = pcli.ok("sessions", "--vm", VM6)
    assert f"[{CLIENT6}]:1000" in text and f"[{VM6}]:22" in text and "1 sessions" in text
    assert f"{VM4}:40000" in pcli.ok("sessions", "--vm", VM4)
    assert pcli.json("sessions", "--vm", "2001:db8:1::11") == []
    pcli.refused("sessions", "--vm", "2001:db8::/64", mentions="not an IP address")


# ---- blacklist --------------------------------------------------------------------------


def test_blacklist_add_list_del_ipv6(pcli):
    pcli.ok("acl", "add", "--vm", VM6, "--proto", "tcp", "--dport", "22")
    out = pcli.ok("blacklist", "add", CLIENT6, "--seconds", "60", "--vm", VM6)
    assert out.strip() == "banned 2001:db8:99:1::/64 for 60 s"
    (rec,) = pcli.json("blacklist", "list")
    assert (rec["ip"], rec["vm"], rec["scope"], rec["active"]) == (
        "2001:db8:99:1::/64", VM6, "all", True)
    assert 55 < rec["expires_in_s"] <= 60
    assert "2001:db8:99:1::/64" in pcli.ok("blacklist", "list")
    assert run(pcli.fw, P.tcp6(CLIENT6_SAME64, 1, VM6, 22, P.SYN)) == "drop-blacklist"
    assert run(pcli.fw, P.tcp6(CLIENT6_OTHER64, 1, VM6, 22, P.SYN)) == "pass-acl"
    assert pcli.json("blacklist", "list")[0]["dropped"] == 1
    assert pcli.ok("blacklist", "del", "2001:db8:99:1::/64").strip() == \
        "unbanned 2001:db8:99:1::/64"
    assert pcli.json("blacklist", "list") == []
    assert run(pcli.fw, P.tcp6(CLIENT6_SAME64, 2, VM6, 22, P.SYN)) == "pass-acl"
    pcli.refused("blacklist", "del", CLIENT6, mentions="not on the blacklist")
    # a ban of any address of the /64 is lifted by any other
    pcli.ok("blacklist", "add", CLIENT6_SAME64)
    (rec,) = pcli.json("blacklist", "list")
    assert rec["vm"] is None and rec["ip"] == "2001:db8:99:1::/64"
    ban_s = pcli.fw.read_config()[pcli.fw.const("CFG_BAN_S")]
    assert ban_s - 5 < rec["expires_in_s"] <= ban_s
    pcli.ok("blacklist", "del", CLIENT6)
    assert pcli.json("blacklist", "list") == []


@pytest.mark.parametrize(("args", "mentions"), [
    (("add", "2001:db8:99::/48"), "IPv6 /64"),
    (("add", "192.0.2.0/24"), "IPv6 /64"),
    (("add", "x"), "not an IP address"),
    (("add", CLIENT6, "--seconds", "0"), "--seconds"),
    (("add", CLIENT6, "--vm", "2001:db8:1::/64"), "not an IP address"),
    (("del", "2001:db8:99:1::/63"), "IPv6 /64"),
])
def test_bad_bans_are_refused(pcli, args, mentions):
    pcli.refused("blacklist", *args, mentions=mentions)


def test_syn_flood_ban_shows_as_its_64(pcli):
    fw = pcli.fw
    pcli.ok("config", "set", "syn-rate", "3")
    pcli.ok("acl", "add", "--vm", VM6, "--proto", "tcp", "--dport", "22")
    reasons = [run(fw, P.tcp6(CLIENT6 if i % 2 else CLIENT6_SAME64, 1000 + i, VM6, 22, P.SYN))
               for i in range(4)]
    assert reasons == ["pass-acl"] * 3 + ["drop-syn-rate"]
    (rec,) = pcli.json("blacklist", "list")
    assert (rec["ip"], rec["vm"]) == ("2001:db8:99:1::/64", VM6)
    counts = pcli.json("stats")
    assert counts["drop-syn-rate"] == 1 and counts["pass-acl"] == 3


# ---- stats ------------------------------------------------------------------------------


def test_stats_show_the_ipv6_reasons(pcli):
    fw = pcli.fw
    assert run(fw, P.ndp("fe80::1", "ff02::1:ff00:10", 135, VM6)) == "pass-ndp"
    assert run(fw, P.udp6("2001:db8:77::1", 1, "2001:db8:78::1", 2)) == "pass-ipv6-unprotected"
    counts = pcli.json("stats")
    assert counts["pass-ndp"] == 1 and counts["pass-ipv6-unprotected"] == 1
    assert sum(counts.values()) == 2
    full = pcli.json("stats", "--bytes")
    assert full["pass-ndp"]["packets"] == 1 and full["pass-ndp"]["bytes"] > 0
    text = pcli.ok("stats")
    assert any(line.split()[:2] == ["pass-ipv6-unprotected", "1"] for line in text.splitlines())
    first_drop = fw.const("SAMIXDP_FIRST_DROP")
    assert list(counts)[:first_drop] == [
        "pass-session", "pass-outbound", "pass-acl", "pass-transit", "pass-non-ip",
        "pass-related", "pass-fragment", "pass-pickup", "pass-ipv6-unprotected", "pass-ndp"]
    assert all(k.startswith("drop-") for k in list(counts)[first_drop:])
