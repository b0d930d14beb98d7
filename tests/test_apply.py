"""The host config file: one case per class of typo, each refused in one line that
names the file and the exact key."""

from __future__ import annotations

from pathlib import Path

import pytest

from sami_xdp.base.errors import InvalidArgument
from sami_xdp.ops.hostconfig import (
    AgentSpec,
    InterfaceSpec,
    load_acl,
    load_host_config,
    parse_host_config,
)

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
