"""Issue 2 integration: the real CLI and XDP program between network namespaces.

client 192.0.2.10 <-> firewall (router, XDP on both links, `--protect 10.1.1.0/24`)
<-> VM 10.1.1.1. The tests share one topology but each attaches what it needs, so they
pass in any order. Then the CLI's error paths, the demo topology script and the demo
itself.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from netns import (
    CLIENT_IP,
    VM_IP,
    VM_NET,
    CoreTopology,
    adopt_demo_topology,
    core_topology,  # noqa: F401  (fixture)
    demo_env,
    demo_topology,
    lab,  # noqa: F401  (fixture)
    one_line_error,
    require_root,
    run_cli,
)

from testbed.netns import (
    REPO,
    TOPOLOGY,
    Lab,
    Netns,
    netns_exists,
    sh,
    tcp_connect,
    unique_suffix,
)

pytestmark = [pytest.mark.netns, pytest.mark.needs_root]

OUT_PORT = 8080  # server in the client namespace, reached by the VM
IN_PORT = 2222  # server in the VM, unsolicited from the client


@pytest.fixture(scope="module")
def served(core_topology: CoreTopology) -> CoreTopology:  # noqa: F811
    """The module's topology with an echo server on each side."""
    t = core_topology
    t.lab.echo_server(t.client, CLIENT_IP, OUT_PORT, lifetime=180)
    t.lab.echo_server(t.vm, VM_IP, IN_PORT, lifetime=180)
    return t


@pytest.fixture
def attached(served: CoreTopology) -> CoreTopology:
    """XDP on both firewall links through `samixdp attach ... --protect`, whatever an
    earlier test did (attaching an attached link is a no-op)."""
    t = served
    for link in t.fw_links:
        res = t.samixdp("attach", link, "--protect", VM_NET, "--mode", "auto")
        assert res.returncode == 0, f"attach {link}: {res.stderr}"
        assert f"attached to {link} in " in res.stdout
        assert t.fw.datapath_prog_id(link) > 0
    return t


def _stats(t: CoreTopology) -> dict[str, int]:
    data = t.samixdp_json("stats")
    assert isinstance(data, dict)
    return data


def test_status_lists_both_links(attached: CoreTopology) -> None:
    st = attached.samixdp_json("status")
    assert isinstance(st, dict)
    modes = {i["ifname"]: i["mode"] for i in st["interfaces"]}
    assert set(modes) == set(attached.fw_links)
    # auto on veth: TC, so the VM's TCP keeps GSO/TSO (native XDP would take it away)
    assert all(m == "tc" for m in modes.values()), modes
    assert st["protected"] == [VM_NET]
    prog_ids = {attached.fw.datapath_prog_id(link) for link in attached.fw_links}
    assert prog_ids == {st["tc_program_id"]}, "both links must run the one pinned program"
    assert not any(attached.fw.xdp_prog_id(link) for link in attached.fw_links)
    tso = attached.vm.run("ethtool", "-k", "sxv-fw").stdout
    assert "tcp-segmentation-offload: on" in tso, tso


def test_outbound_tcp_passes_and_is_established(attached: CoreTopology) -> None:
    t = attached
    conn = t.lab.held_connection(t.vm, CLIENT_IP, OUT_PORT)
    assert conn.established(), f"VM -> client connect failed: {conn.reader.seen}"
    rows = t.samixdp_json("sessions")
    assert isinstance(rows, list)
    mine = [
        r for r in rows
        if r["proto"] == "tcp" and r["src"] == VM_IP and r["sport"] == conn.local_port
        and r["dst"] == CLIENT_IP and r["dport"] == OUT_PORT
    ]
    assert len(mine) == 1, f"session VM -> client missing: {rows}"
    row = mine[0]
    assert row["state"] == "ESTABLISHED", row
    assert row["packets"] >= 4 and row["bytes"] > 0, row  # handshake + one echo
    by_vm = t.samixdp_json("sessions", "--vm", VM_IP)
    assert isinstance(by_vm, list) and any(r["sport"] == conn.local_port for r in by_vm)
    rc, out = conn.release()
    assert rc == 0, f"data after the session check failed: {out}"
    assert _stats(t)["pass-outbound"] >= 1


def test_unsolicited_inbound_is_dropped_and_counted(attached: CoreTopology) -> None:
    t = attached
    before = _stats(t)["drop-acl-default"]
    ok, out = tcp_connect(t.client, VM_IP, IN_PORT, timeout=1.5)
    assert not ok, f"unsolicited client -> VM connect got through: {out}"
    assert "timed out" in out, out  # dropped, not refused: the VM's server is listening
    after = _stats(t)["drop-acl-default"]
    assert after > before, (before, after)
    rows = t.samixdp_json("sessions")
    assert isinstance(rows, list)
    assert not [r for r in rows if r["src"] == CLIENT_IP], rows


def test_native_mode_is_still_xdp(attached: CoreTopology) -> None:
    """--mode native keeps the XDP program (for NIC drivers); auto and tc share its maps."""
    t = attached
    link = t.fw_links[1]
    assert t.samixdp("detach", link).returncode == 0
    res = t.samixdp("attach", link, "--mode", "native")
    assert res.returncode == 0 and f"attached to {link} in native mode" in res.stdout, res
    st = t.samixdp_json("status")
    assert isinstance(st, dict)
    assert {i["ifname"]: i["mode"] for i in st["interfaces"]}[link] == "native"
    assert t.fw.xdp_prog_id(link) == st["program_id"] and t.fw.tc_prog_ids(link) == []
    again = t.samixdp("attach", link, "--mode", "tc")
    assert again.returncode != 0 and "already runs sami-xdp in native mode" in again.stderr
    conn = t.lab.held_connection(t.vm, CLIENT_IP, OUT_PORT)
    assert conn.established(), f"VM -> client through native XDP: {conn.reader.seen}"
    assert conn.release()[0] == 0
    assert t.samixdp("detach", link).returncode == 0


def test_detach_restores_plain_forwarding(attached: CoreTopology) -> None:
    t = attached
    ok, out = tcp_connect(t.client, VM_IP, IN_PORT, timeout=1.5)
    assert not ok, f"still attached, yet: {out}"
    for link in t.fw_links:
        res = t.samixdp("detach", link)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == f"detached from {link}"
        assert t.fw.datapath_prog_id(link) == 0
        assert t.fw.tc_prog_ids(link) == []
    st = t.samixdp_json("status")
    assert isinstance(st, dict) and st["interfaces"] == []
    ok, out = tcp_connect(t.client, VM_IP, IN_PORT, timeout=1.5)
    assert ok, f"plain forwarding after detach: {out}"
    again = t.samixdp("detach", t.fw_links[0])
    assert "not attached" in one_line_error(again)


# ---- CLI errors ------------------------------------------------------------------


def _error_ns(lab: Lab) -> Netns:  # noqa: F811
    """A private namespace, so nothing a buggy CLI does can reach the host's links."""
    return lab.netns("e")


def test_attach_missing_interface(lab: Lab) -> None:  # noqa: F811
    ns = _error_ns(lab)
    bpffs = lab.run_dir / "bpf"
    res = run_cli(["--bpffs", str(bpffs), "attach", "sxnope0", "--protect", VM_NET], ns=ns)
    err = one_line_error(res)
    assert "sxnope0" in err and "no such interface" in err, err
    assert not (bpffs / "prog").exists()


@pytest.mark.parametrize("where", ["plain-dir", "empty-bpffs"])
@pytest.mark.parametrize(
    "args",
    [["status"], ["sessions"], ["sessions", "--json"], ["stats"], ["gc"], ["config", "show"],
     ["detach", "lo"]],
    ids=lambda a: "-".join(a),
)
def test_commands_with_nothing_loaded(lab: Lab, where: str, args: list[str]) -> None:  # noqa: F811
    ns = _error_ns(lab)
    if where == "empty-bpffs":
        path = lab.bpffs()
    else:
        path = lab.run_dir / "plain"
        path.mkdir(parents=True)
    res = run_cli(["--bpffs", str(path), *args], ns=ns)
    err = one_line_error(res)
    assert str(path) in err, err
    assert "attach" in err, f"no hint how to load anything: {err}"
    assert ns.xdp_prog_id("lo") == 0


def test_nothing_loaded_via_env(lab: Lab) -> None:  # noqa: F811
    ns = _error_ns(lab)
    path = lab.bpffs()
    res = run_cli(["stats"], ns=ns, env={"SAMIXDP_BPFFS": str(path)})
    assert "nothing is loaded" in one_line_error(res)


@pytest.mark.parametrize("mode", ["turbo", "NATIVE", ""])
def test_bad_mode(lab: Lab, mode: str) -> None:  # noqa: F811
    ns = _error_ns(lab)
    bpffs = lab.run_dir / "bpf"
    res = run_cli(["--bpffs", str(bpffs), "attach", "lo", "--mode", mode], ns=ns)
    err = one_line_error(res)
    assert "--mode" in err, err
    assert res.returncode == 2
    assert ns.xdp_prog_id("lo") == 0
    assert not bpffs.exists(), "a rejected attach must not touch the bpffs"


# ---- the demo topology script and the demo -------------------------------------------


def test_topology_script_moves_vm_with_live_connection(lab: Lab) -> None:  # noqa: F811
    suffix = "t" + unique_suffix()
    demo_topology(lab, suffix, "up")
    env = demo_env(lab, suffix)
    assert env["SX_NS_A"] == f"sxfa{suffix}" and env["SX_VM_IP"] == VM_IP
    for host in ("A", "B"):
        bpffs = Path(env[f"SX_{host}_BPFFS"])
        assert bpffs.is_dir() and str(bpffs).startswith(f"/run/sx{suffix}/")
    assert "uplink: A" in demo_topology(lab, suffix, "status").stdout
    client, vm = Netns(env["SX_NS_CLIENT"]), Netns(env["SX_NS_VM"])
    lab.echo_server(client, CLIENT_IP, OUT_PORT)
    lab.echo_server(vm, VM_IP, IN_PORT)
    out_conn = lab.held_connection(vm, CLIENT_IP, OUT_PORT)
    in_conn = lab.held_connection(client, VM_IP, IN_PORT)
    assert out_conn.established() and in_conn.established()

    moved = demo_topology(lab, suffix, "move-to-b")
    assert "behind B" in moved.stdout
    status = demo_topology(lab, suffix, "status").stdout
    assert "uplink: B" in status and "via 10.9.2.2" in status, status
    for conn in (out_conn, in_conn):  # both connections carry data after the move
        rc, lines = conn.release()
        assert rc == 0, lines
    ok, out = tcp_connect(client, VM_IP, IN_PORT)
    assert ok, out
    demo_topology(lab, suffix, "move-to-a")
    assert "uplink: A" in demo_topology(lab, suffix, "status").stdout
    ok, out = tcp_connect(client, VM_IP, IN_PORT)
    assert ok, out

    demo_topology(lab, suffix, "down")
    assert not any(netns_exists(f"sx{r}{suffix}") for r in ("cl", "gw", "fa", "fb", "vm"))
    assert not Path(f"/run/sx{suffix}").exists()
    demo_topology(lab, suffix, "down")  # safe twice
    assert "down" in demo_topology(lab, suffix, "status").stdout


def test_topology_script_rejects_bad_suffix() -> None:
    res = sh("bash", TOPOLOGY, "up", env={"SX_SUFFIX": "Bad-Suffix"}, check=False)
    assert res.returncode != 0 and "SX_SUFFIX" in res.stderr


def test_demo_core(lab: Lab) -> None:  # noqa: F811
    require_root()
    suffix = "d" + unique_suffix()
    adopt_demo_topology(lab, suffix)
    res = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo_core.sh")], capture_output=True, text=True,
        timeout=180, env={**os.environ, "SX_SUFFIX": suffix}, stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-2000:]}"
    assert "PASS: outbound" in res.stdout
    assert "ESTABLISHED" in res.stdout and "drop-acl-default" in res.stdout
    assert not netns_exists(f"sxfa{suffix}") and not Path(f"/run/sx{suffix}").exists()
