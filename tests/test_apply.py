"""The host config file and `samixdp apply`.

First the file alone (pure Python): one case per class of typo, each refused in one
line that names the file and the exact key. Then the real thing in a namespace lab
(client <-> firewall <-> VM, testbed.topology): `samixdp apply` from the example
config (contrib/, interface names substituted) brings a fresh host up, a second run
changes nothing, an edited file is reconciled exactly, `--check` and a broken file
change nothing, rules a real `samixdp import` brought for a VM survive, mode and role
changes, and two applies at once.

The namespace tests share one firewall (a compile costs seconds): each starts with an
apply of the base file, which is itself what is under test, since apply is declarative.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import run_frame
from netns import CLIENT_IP, VM_IP, VM_NET, VM_NET6, one_line_error, require_root

from sami_xdp.base.errors import InvalidArgument
from sami_xdp.loader.pinned import Firewall
from sami_xdp.migrate import HostIdentity, TrustStore, build_bundle, new_migration_id
from sami_xdp.ops.hostconfig import (
    AgentSpec,
    InterfaceSpec,
    load_acl,
    load_host_config,
    parse_host_config,
)
from sami_xdp.policy import acl, protect
from testbed import packets as pk
from testbed.netns import SAMIXDP, Lab, tcp_connect
from testbed.topology import CoreTopology, build_core

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "contrib" / "samixdp.toml"
EXAMPLE_ACL = REPO / "contrib" / "acl.yaml"
P = Path("/etc/samixdp/samixdp.toml")


# ---- the file alone ------------------------------------------------------------------


def refused(text: str, key: str) -> str:
    """The file is refused in one line naming the file and then exactly `key`."""
    with pytest.raises(InvalidArgument) as info:
        parse_host_config(text, P)
    msg = str(info.value)
    assert "\n" not in msg, msg
    head = f"{P}: {key}"
    assert msg.startswith(head) and msg[len(head)] in ": ", msg
    return msg


GOOD = """
[firewall]
protect = ["10.1.1.0/24", "2001:db8:1::/64"]
[[interface]]
name = "eth0"
[[interface]]
name = "eth1"
mode = "tc"
role = "vm"
"""


def test_a_good_file_and_its_defaults() -> None:
    cfg = parse_host_config(GOOD, P)
    assert cfg.interfaces == (InterfaceSpec("eth0", "auto", "auto"),
                              InterfaceSpec("eth1", "tc", "vm"))
    assert [str(n) for n in cfg.firewall.protect] == ["10.1.1.0/24", "2001:db8:1::/64"]
    assert (cfg.firewall.max_sessions, cfg.firewall.max_unassured) == (1 << 20, 1 << 18)
    assert cfg.firewall.acl is None and dict(cfg.settings) == {}
    assert cfg.agent == AgentSpec()
    empty = parse_host_config("", P)
    assert empty.interfaces == () and empty.firewall.protect == ()


def test_the_example_is_valid_and_its_acl_loads() -> None:
    cfg = load_host_config(EXAMPLE)
    assert [i.name for i in cfg.interfaces] == ["eth0", "eth1"]
    assert cfg.firewall.acl == EXAMPLE_ACL
    assert dict(cfg.settings) == {"syn-rate": 200, "ban": 60, "timeout.established": 432000,
                                  "frag-policy": 0}
    assert (cfg.agent.listen, cfg.agent.pickup_s, cfg.agent.metrics) == ("0.0.0.0:7800", 10.0,
                                                                         None)
    rules = load_acl(cfg)
    assert [(str(r.dst), r.proto, r.action) for r in rules] == [
        ("10.1.1.1/32", "tcp", "allow"), ("10.1.1.0/24", "icmp", "allow"),
        ("2001:db8:1::/64", "icmpv6", "allow"), ("10.1.1.0/24", "any", "deny"),
    ]


def test_unknown_keys_anywhere_are_refused_with_a_guess() -> None:
    assert "did you mean 'firewall'" in refused("[firewal]\n", "firewal")
    refused("interfaces = []\n", "interfaces")
    assert "'max_sessions'" in refused("[firewall]\nmax_session = 5\n", "firewall.max_session")
    refused(GOOD + 'rol = "vm"\n', "interface[2].rol")
    assert "'syn-rate'" in refused("[settings]\nsyn_rate = 5\n", "settings.syn_rate")
    refused("[settings]\n\"timeout.establshed\" = 5\n", 'settings."timeout.establshed"')
    refused("[settings]\ntimeout.nosuch = 5\n", 'settings."timeout.nosuch"')
    refused('[agent]\nlisten = "127.0.0.1:7800"\nplaintext = true\n', "agent.plaintext")


def test_interfaces_bad_duplicate_or_malformed() -> None:
    assert "nativ" in refused(GOOD.replace('"tc"', '"nativ"'), "interface[2].mode")
    refused(GOOD.replace('"vm"', '"VM"'), "interface[2].role")
    assert "also interface[1]" in refused(GOOD.replace('"eth1"', '"eth0"'), "interface[2].name")
    refused(GOOD.replace('"eth1"', '"' + "x" * 16 + '"'), "interface[2].name")
    refused(GOOD.replace('"eth1"', '"../eth1"'), "interface[2].name")
    refused(GOOD.replace('"eth1"', '""'), "interface[2].name")
    refused(GOOD.replace('name = "eth1"', ""), "interface[2].name")
    refused(GOOD.replace('"eth1"', "1"), "interface[2].name")
    refused('[interface]\nname = "eth0"\n', "interface")
    refused('interface = ["eth0"]\n', "interface[1]")


def test_prefixes_bad_duplicate_or_too_wide() -> None:
    for bad in ('"10.1.1.0/33"', '"x"', '"2001:db8::/129"', "10", '"::/0"'):
        refused(f'[firewall]\nprotect = ["10.2.0.0/16", {bad}]\n', "firewall.protect[2]")
    msg = refused('[firewall]\nprotect = ["10.1.1.0/24", "10.1.1.7/24"]\n', "firewall.protect[2]")
    assert "listed twice" in msg
    refused('[firewall]\nprotect = "10.1.1.0/24"\n', "firewall.protect")


def test_numbers_out_of_range_or_of_the_wrong_type() -> None:
    for bad in ("0", "-1", str(1 << 25), '"1M"', "true", "1.5", "nan"):
        refused(f"[firewall]\nmax_sessions = {bad}\n", "firewall.max_sessions")
    refused(f"[firewall]\nmax_unassured = {1 << 23}\n", "firewall.max_unassured")
    for name, bad in (("syn-rate", "0"), ("syn-rate", '"500/s"'), ("ban", "-1"),
                      ("ban", str(2**33)), ("tcp-liberal", "2"), ("frag-policy", '"reassemble"'),
                      ("frag-policy", "1"), ("syn-window-ms", "inf")):
        refused(f"[settings]\n{name} = {bad}\n", f"settings.{name}")
    refused('[settings]\n"timeout.established" = -5\n', 'settings."timeout.established"')
    for name, bad in (("pickup", "nan"), ("pickup", "3601"), ("timeout", "0"), ("idle", "-inf"),
                      ("max_conns", "0"), ("max_message", "1.5"), ("max_bundles", "65"),
                      ("handshake_timeout", '"10"'), ("listen", '"x"'), ("listen", '"[::1]:0"'),
                      ("metrics", '"127.0.0.1:70000"'), ("listen", "7800")):
        refused(f"[agent]\n{name} = {bad}\n", f"agent.{name}")


def test_settings_take_dotted_or_quoted_keys_but_not_both() -> None:
    dotted = parse_host_config("[settings]\ntimeout.established = 3600\n", P)
    quoted = parse_host_config('[settings]\n"timeout.established" = 3600\n', P)
    assert dict(dotted.settings) == dict(quoted.settings) == {"timeout.established": 3600}
    both = '[settings]\n"timeout.established" = 1\ntimeout.established = 2\n'
    assert "twice" in refused(both, 'settings."timeout.established"')


def test_toml_syntax_errors_name_the_line() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_host_config('[firewall]\nmax_sessions = = 5\n', P)
    assert str(info.value).startswith(f"{P}: not valid TOML:") and "line 2" in str(info.value)
    assert "\n" not in str(info.value)


def _files(tmp_path: Path, toml: str, acl: str | None = None) -> Path:
    path = tmp_path / "samixdp.toml"
    path.write_text(toml)
    if acl is not None:
        (tmp_path / "acl.yaml").write_text(acl)
    return path


def test_acl_rules_are_checked_against_the_files_prefixes(tmp_path: Path) -> None:
    toml = '[firewall]\nprotect = ["10.1.1.0/24"]\nacl = "acl.yaml"\n'
    ok = load_host_config(_files(tmp_path, toml, "rules:\n  - vm: 10.1.1.5\n    proto: tcp\n"))
    assert [str(r.dst) for r in load_acl(ok)] == ["10.1.1.5/32"]
    for rules, what in (("rules:\n  - vm: 10.9.9.9\n", "not inside a protected prefix"),
                        ("rules:\n  - vm: 10.1.1.5\n    prot: tcp\n", "unknown keys prot"),
                        ("rules: [", "not valid")):
        cfg = load_host_config(_files(tmp_path, toml, rules))
        with pytest.raises(InvalidArgument) as info:
            load_acl(cfg)
        msg = str(info.value)
        assert msg.startswith(f"{cfg.path}: firewall.acl: ") and what in msg, msg
    (tmp_path / "acl.yaml").unlink()
    with pytest.raises(InvalidArgument, match="firewall.acl: .* not a readable regular file"):
        load_acl(load_host_config(_files(tmp_path, toml)))


def test_a_file_others_may_write_is_refused(tmp_path: Path) -> None:
    path = _files(tmp_path, GOOD)
    path.chmod(0o664)
    with pytest.raises(InvalidArgument, match="writable by group or others"):
        load_host_config(path)
    path.chmod(0o644)
    tmp_path.chmod(0o777)
    try:
        with pytest.raises(InvalidArgument, match="directory of the host config file"):
            load_host_config(path)
    finally:
        tmp_path.chmod(0o755)
    assert load_host_config(path).interfaces
    with pytest.raises(InvalidArgument, match="not a readable regular"):
        load_host_config(tmp_path)


# ---- the real thing: a namespace lab -------------------------------------------------

LINKS = ("sxf-cl", "sxf-vm")  # the firewall's uplink and VM-side links (testbed.topology)
SSH, OTHER = 22, 2222  # servers in the VM: the example's ACL lets the client reach 22 only
OUT = 8080  # a server in the client namespace, for the VM's own connections


def example_text() -> str:
    """The example with this lab's interface names."""
    return EXAMPLE.read_text().replace('"eth0"', f'"{LINKS[0]}"').replace('"eth1"', f'"{LINKS[1]}"')


@dataclass
class Host:
    t: CoreTopology
    config: Path  # the config dir: samixdp.toml and acl.yaml
    state: Path

    def cli(self, *args: str, state: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.t.fw.run(
            SAMIXDP, "--bpffs", self.t.bpffs, "--config-dir", self.config,
            "--state-dir", state or self.state, *args, check=False, timeout=timeout,
        )

    def ok(self, *args: str, state: Path | None = None) -> list[str]:
        res = self.cli(*args, state=state)
        assert res.returncode == 0 and not res.stderr, f"{args}: {res.stdout} {res.stderr}"
        return res.stdout.splitlines()

    def json(self, *args: str) -> object:
        return json.loads("\n".join(self.ok(*args, "--json")))

    def write(self, toml: str, acl: str | None = None) -> None:
        (self.config / "samixdp.toml").write_text(toml)
        (self.config / "acl.yaml").write_text(acl if acl is not None else EXAMPLE_ACL.read_text())

    def base(self) -> None:
        """The example file applied (from whatever state an earlier test left)."""
        self.write(example_text())
        self.ok("apply")
        assert self.ok("apply") == ["nothing to change"]

    def snapshot(self) -> dict[str, object]:
        """Everything apply may change, as the CLI and the kernel report it."""
        return {
            "status": self.json("status"),
            "config": self.json("config", "show"),
            "acl": self.json("acl", "list"),
            "tc": {link: self.t.fw.tc_prog_ids(link) for link in LINKS},
            "xdp": {link: self.t.fw.xdp_prog_id(link) for link in LINKS},
        }

    def fresh(self) -> None:
        """A host with nothing loaded."""
        st = self.cli("status", "--json")
        if st.returncode == 0:
            for i in json.loads(st.stdout)["interfaces"]:
                self.ok("detach", i["ifname"])
            self.ok("reset", "--yes")
        assert self.cli("status").returncode != 0


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    require_root()
    with Lab(tag="a") as lab:
        t = build_core(lab)
        for port in (SSH, OTHER):
            lab.echo_server(t.vm, VM_IP, port, lifetime=600)
        lab.echo_server(t.client, CLIENT_IP, OUT, lifetime=600)
        config = lab.run_dir / "config"
        config.mkdir(mode=0o755)
        yield Host(t, config, lab.run_dir / "state")


def _interfaces(h: Host) -> dict[str, tuple[str, str]]:
    st = h.json("status")
    assert isinstance(st, dict)
    return {i["ifname"]: (i["mode"], i["role"]) for i in st["interfaces"]}


def _rules(h: Host) -> list[tuple[object, ...]]:
    rows = h.json("acl", "list")
    assert isinstance(rows, list)
    return [(r["priority"], r["action"], r["vm"], r["proto"], r["dport"], r["src"]) for r in rows]


BASE_RULES = [
    (1, "deny", "10.1.1.0/24", "any", "any", "198.51.100.0/24"),
    (1000, "allow", "10.1.1.1", "tcp", "22", "192.0.2.0/24"),
    (1000, "allow", "10.1.1.0/24", "icmp", "any", "0.0.0.0/0"),
    (1000, "allow", "2001:db8:1::/64", "icmpv6", "any", "::/0"),
]


@pytest.mark.netns
@pytest.mark.needs_root
def test_the_example_brings_up_a_fresh_host_and_a_second_run_changes_nothing(host: Host) -> None:
    h = host
    h.fresh()
    h.write(example_text())
    plan = h.ok("apply", "--check")
    assert plan[:-1] == [
        "would create the firewall (max_sessions 1048576, max_unassured 262144)",
        f"would protect {VM_NET}", f"would protect {VM_NET6}",
        "would load 4 ACL rules from acl.yaml",
        f"would attach {LINKS[0]} (tc, role uplink)", f"would attach {LINKS[1]} (tc, role vm)",
    ]
    assert plan[-1].endswith("is valid; 6 changes would bring the host in sync")
    assert h.cli("status").returncode != 0, "--check loaded something"
    done = h.ok("apply")
    assert done == [line.removeprefix("would ") for line in plan[:-1]] + ["6 changes made"]
    assert _interfaces(h) == {LINKS[0]: ("tc", "uplink"), LINKS[1]: ("tc", "vm")}
    st = h.json("status")
    assert isinstance(st, dict) and st["protected"] == [VM_NET, VM_NET6]
    assert st["maps"]["sessions"]["max_entries"] == 1 << 20
    assert all(h.t.fw.tc_prog_ids(link) == [st["tc_program_id"]] for link in LINKS)
    cfg = h.json("config", "show")
    assert isinstance(cfg, dict)
    assert (cfg["syn-rate"], cfg["ban"], cfg["timeout.established"]) == (200, 60, 432000)
    assert _rules(h) == BASE_RULES
    # real packets: the ACL lets the client reach the VM's port 22 and nothing else
    ok, out = tcp_connect(h.t.client, VM_IP, SSH)
    assert ok, out
    ok, out = tcp_connect(h.t.client, VM_IP, OTHER, timeout=1.0)
    assert not ok and "timed out" in out, out
    ok, out = tcp_connect(h.t.vm, CLIENT_IP, OUT)
    assert ok, out  # the VM's own connections open sessions
    assert h.ok("apply") == ["nothing to change"]
    check = h.ok("apply", "--check")
    assert len(check) == 1 and check[0].endswith("the host is in sync: nothing to change")
    as_json = h.json("apply")
    assert as_json == {"file": str(h.config / "samixdp.toml"), "check": False, "in_sync": True,
                       "changes": []}


EDITED_ACL = """\
rules:
  - vm: 10.1.1.1
    proto: tcp
    dport: 2222
    src: 192.0.2.0/24
  - vm: 10.2.0.0/24
    proto: tcp
    dport: 80
  - vm: 10.1.1.0/24
    proto: icmp
"""


def edited_text() -> str:
    """The example without the uplink, syn-rate 500, a third prefix, another ACL."""
    text = example_text()
    uplink = f'[[interface]]\nname = "{LINKS[0]}"\nmode = "auto"\nrole = "uplink"\n'
    assert uplink in text
    text = text.replace(uplink, "").replace("syn-rate = 200", "syn-rate = 500")
    text = text.replace('protect = ["10.1.1.0/24"', 'protect = ["10.1.1.0/24", "10.2.0.0/24"')
    assert 'ban = 60' in text
    return text.replace("ban = 60 ", "#ban = 60")


@pytest.mark.netns
@pytest.mark.needs_root
def test_an_edited_file_is_reconciled_exactly(host: Host) -> None:
    h = host
    h.base()
    # what an operator changed by hand meanwhile goes back to the file too
    h.ok("config", "set", "tcp-liberal", "1")
    h.ok("protect", "10.3.0.0/24")
    h.ok("acl", "add", "--vm", VM_NET, "--proto", "udp", "--dport", "53")
    h.write(edited_text(), EDITED_ACL)
    done = h.ok("apply")
    assert done == [
        "protect 10.2.0.0/24",
        "set syn-rate 200 -> 500",
        "set tcp-liberal 1 -> 0 (the default)",
        "load 3 ACL rules from acl.yaml (replacing 5)",
        "unprotect 10.3.0.0/24",
        f"detach {LINKS[0]}",
        "6 changes made",
    ]
    assert _interfaces(h) == {LINKS[1]: ("tc", "vm")}
    assert h.t.fw.tc_prog_ids(LINKS[0]) == [] and h.t.fw.datapath_prog_id(LINKS[1]) > 0
    st = h.json("status")
    assert isinstance(st, dict) and st["protected"] == [VM_NET, "10.2.0.0/24", VM_NET6]
    cfg = h.json("config", "show")
    assert isinstance(cfg, dict)
    assert (cfg["syn-rate"], cfg["ban"], cfg["tcp-liberal"]) == (500, 60, 0)
    assert _rules(h) == [
        (1000, "allow", "10.1.1.1", "tcp", "2222", "192.0.2.0/24"),
        (1000, "allow", "10.2.0.0/24", "tcp", "80", "0.0.0.0/0"),
        (1000, "allow", "10.1.1.0/24", "icmp", "any", "0.0.0.0/0"),
    ]
    assert h.ok("apply") == ["nothing to change"]
    # the ban line commented out: a ban changed by hand goes back to the default
    h.ok("config", "set", "ban", "120")
    assert h.ok("apply") == ["set ban 120 -> 60 (the default)", "1 changes made"]
    # and back to the example
    h.write(example_text())
    assert h.ok("apply") == [
        "set syn-rate 500 -> 200",
        "load 4 ACL rules from acl.yaml (replacing 3)",
        "unprotect 10.2.0.0/24",
        f"attach {LINKS[0]} (tc, role uplink)",
        "4 changes made",
    ]
    assert _rules(h) == BASE_RULES
    assert _interfaces(h) == {LINKS[0]: ("tc", "uplink"), LINKS[1]: ("tc", "vm")}


@pytest.mark.netns
@pytest.mark.needs_root
def test_check_changes_nothing(host: Host) -> None:
    h = host
    h.base()
    h.write(edited_text(), EDITED_ACL)
    before = h.snapshot()
    assert h.ok("apply", "--check") == [
        "would protect 10.2.0.0/24",
        "would set syn-rate 200 -> 500",
        "would load 3 ACL rules from acl.yaml (replacing 4)",
        f"would detach {LINKS[0]}",
        f"{h.config / 'samixdp.toml'} is valid; 4 changes would bring the host in sync",
    ]
    plan = h.json("apply", "--check")
    assert isinstance(plan, dict) and plan["check"] is True and plan["in_sync"] is False
    assert plan["file"] == str(h.config / "samixdp.toml")
    kinds = [(c["kind"], c["subject"], c["before"], c["after"]) for c in plan["changes"]]
    assert kinds == [
        ("protect", "10.2.0.0/24", None, "10.2.0.0/24"),
        ("setting", "syn-rate", "200", "500"),
        ("acl", "acl", 4, 3),
        ("detach", LINKS[0], "tc", None),
    ], kinds
    assert h.snapshot() == before


@pytest.mark.netns
@pytest.mark.needs_root
def test_a_broken_file_changes_nothing(host: Host) -> None:
    h = host
    h.base()
    good = edited_text()  # valid changes, so a half-applied file would show
    before = h.snapshot()
    file = str(h.config / "samixdp.toml")
    cases = [  # (file, ACL file, what the one line says)
        (good.replace("[agent]", "[agnet]"), EDITED_ACL, f"{file}: agnet: unknown key"),
        (good.replace('mode = "auto"', 'mode = "nativ"'), EDITED_ACL,
         f"{file}: interface[1].mode: must be one of"),
        (good.replace('"10.2.0.0/24"', '"10.2.0.0/33"'), EDITED_ACL,
         f"{file}: firewall.protect[2]: not an IP prefix"),
        (good.replace("syn-rate = 500", "syn-rate = 0"), EDITED_ACL,
         f"{file}: settings.syn-rate: syn-rate must be at least 1"),
        (good, "rules:\n  - vm: 10.9.9.9\n",
         f"{file}: firewall.acl: {h.config / 'acl.yaml'}: rule 1: 10.9.9.9/32 is not inside"),
        (good.replace("max_sessions = 1048576", "max_sessions = 65536"), EDITED_ACL,
         f"{file}: firewall.max_sessions is 65536 but the loaded firewall has 1048576"),
        (good.replace("max_unassured = 262144", "max_unassured = 4096"), EDITED_ACL,
         "`samixdp reset --yes`"),
        (good.replace(f'name = "{LINKS[1]}"', 'name = "sxnone0"'), EDITED_ACL,
         "no such interface: sxnone0"),
        (good + "[[interface]\n", EDITED_ACL, f"{file}: not valid TOML"),
    ]
    for toml, rules, says in cases:
        h.write(toml, rules)
        for args in (("apply",), ("apply", "--check"), ("apply", "--json")):
            err = one_line_error(h.cli(*args))
            assert says in err, (args, err)
        assert h.snapshot() == before, says
    missing = h.config / "nosuch.toml"
    for args in (("apply", "--file", str(missing)), ("apply", "--check", "--file", str(missing))):
        assert f"{missing} is not a readable regular host config file" in one_line_error(
            h.cli(*args))
    (h.config / "samixdp.toml").unlink()  # the default file is <config-dir>/samixdp.toml
    assert f"{file} is not a readable" in one_line_error(h.cli("apply"))
    assert h.snapshot() == before


# ---- rules a migration brought -------------------------------------------------------

GUEST = "10.1.1.9"  # a VM the example's ACL does not name


def _bundle(src: Firewall, ident: HostIdentity, vm: str, path: Path) -> Path:
    path.write_bytes(build_bundle(src, vm, "host-a", 1, new_migration_id(), "full",
                                  identity=ident))
    return path


@pytest.mark.netns
@pytest.mark.needs_root
def test_rules_a_migration_imported_survive_unless_the_file_names_their_vm(
    host: Host, fw: Firewall, tmp_path: Path
) -> None:
    """Two real `samixdp import`s: one of a VM the file does not name (its rules stay,
    ids and hit counters too), one of 10.1.1.1, which the file names (the file wins).
    The import records decide, not rule ids."""
    h = host
    h.base()
    # the source host (the session's compiled firewall): the VMs' own rules
    protect.add_protected(fw, VM_NET)
    acl.add_rules(fw, [
        acl.make_rule(fw, vm=GUEST, proto="tcp", dport="2222", priority=5),
        acl.make_rule(fw, vm=GUEST, proto="udp", action="deny", priority=6),
        acl.make_rule(fw, vm=VM_IP, proto="tcp", dport="9999"),
    ])
    assert run_frame(fw, pk.tcp(CLIENT_IP, 40000, GUEST, 2222, pk.SYN)) == "PASS"  # a hit
    b = HostIdentity.init(tmp_path / "b", "host-b")
    HostIdentity.init(h.config, "host-a", force=True)  # next to samixdp.toml, as in /etc
    trust = TrustStore.load(h.config)
    trust.add("host-b", "127.0.0.1:1", b.public_b64, vms=VM_NET)
    trust.save()
    imports = tmp_path / "state"  # this test's import records (the lab's stay empty)
    for vm in (GUEST, VM_IP):
        out = h.ok("import", str(_bundle(fw, b, vm, tmp_path / f"{vm}.bundle")), state=imports)
        assert out[0].startswith(f"imported {vm} from host-b"), out
    rows = h.json("acl", "list")
    assert isinstance(rows, list)
    guest = [r for r in rows if r["vm"] == GUEST]
    assert [(r["dport"], r["action"], r["hits"]) for r in guest] == [
        ("2222", "allow", 1), ("any", "deny", 0)]
    assert [r["dport"] for r in rows if r["vm"] == VM_IP] == ["9999"]  # replaced the file's
    check = h.ok("apply", "--check", state=imports)
    assert check[0] == ("would load 4 ACL rules from acl.yaml (replacing 4; "
                        "2 imported VM rules kept)"), check
    assert h.ok("apply", state=imports)[0] == check[0].removeprefix("would ")
    after = h.json("acl", "list")
    assert isinstance(after, list)
    assert [r for r in after if r["vm"] == GUEST] == guest  # ids and hit counters kept
    assert sorted(_rules(h)) == sorted(BASE_RULES + [
        (5, "allow", GUEST, "tcp", "2222", "0.0.0.0/0"),
        (6, "deny", GUEST, "udp", "any", "0.0.0.0/0")])
    assert h.ok("apply", state=imports) == ["nothing to change"]
    # an ACL reload by hand restarts ids at 1: apply still tells the VM's rules by
    # address and import record
    reload_file = tmp_path / "all.yaml"
    reload_file.write_text("rules:\n" + "".join(
        f"  - vm: {r[2]}\n    proto: {r[3]}\n    priority: {r[0]}\n    action: {r[1]}\n"
        + (f"    dport: {r[4]}\n" if r[4] != "any" else "")
        + (f"    src: {r[5]}\n" if not r[5].endswith("/0") else "")
        for r in _rules(h)))
    h.ok("acl", "load", str(reload_file))
    assert h.ok("apply", state=imports) == ["nothing to change"]
    # without the import records (the lab's own state dir), they are no VM's: the file's
    assert h.ok("apply")[0] == "load 4 ACL rules from acl.yaml (replacing 6)"
    assert _rules(h) == BASE_RULES


# ---- mode and role, and two applies at once ------------------------------------------


@pytest.mark.netns
@pytest.mark.needs_root
def test_mode_and_role_changes(host: Host) -> None:
    h = host
    h.base()
    text = example_text()
    vm_link = f'name = "{LINKS[1]}"\nmode = "auto"'
    uplink_role = f'name = "{LINKS[0]}"\nmode = "auto"\nrole = "uplink"'
    assert vm_link in text and uplink_role in text
    h.write(text.replace(vm_link, vm_link.replace("auto", "native")).replace(
        uplink_role, uplink_role.replace("uplink", "auto")))
    assert h.ok("apply") == [
        f"re-attach {LINKS[1]} (tc -> native)",
        f"set the role of {LINKS[0]} uplink -> auto",
        "2 changes made",
    ]
    assert _interfaces(h) == {LINKS[0]: ("tc", "auto"), LINKS[1]: ("native", "vm")}
    st = h.json("status")
    assert isinstance(st, dict)
    assert h.t.fw.xdp_prog_id(LINKS[1]) == st["program_id"] and h.t.fw.tc_prog_ids(LINKS[1]) == []
    ok, out = tcp_connect(h.t.vm, CLIENT_IP, OUT)
    assert ok, out
    h.write(text)
    assert h.ok("apply") == [
        f"re-attach {LINKS[1]} (native -> tc)",
        f"set the role of {LINKS[0]} auto -> uplink",
        "2 changes made",
    ]
    assert h.t.fw.xdp_prog_id(LINKS[1]) == 0 and h.t.fw.tc_prog_ids(LINKS[1]) == [
        st["tc_program_id"]]
    assert _interfaces(h) == {LINKS[0]: ("tc", "uplink"), LINKS[1]: ("tc", "vm")}


@pytest.mark.netns
@pytest.mark.needs_root
def test_concurrent_applies_on_a_fresh_host_serialise(host: Host) -> None:
    h = host
    h.fresh()
    h.write(example_text())
    args = [SAMIXDP, "--bpffs", h.t.bpffs, "--config-dir", h.config, "--state-dir", h.state,
            "apply"]
    procs = [h.t.lab.spawn(h.t.fw, *args, lifetime=120) for _ in range(2)]
    outs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=130)
        assert proc.returncode == 0, out
        outs.append(out.decode().splitlines())
    assert sorted(o[-1] for o in outs) == ["6 changes made", "nothing to change"], outs
    assert _interfaces(h) == {LINKS[0]: ("tc", "uplink"), LINKS[1]: ("tc", "vm")}
    st = h.json("status")
    assert isinstance(st, dict)
    assert all(h.t.fw.tc_prog_ids(link) == [st["tc_program_id"]] for link in LINKS)
    assert _rules(h) == BASE_RULES
