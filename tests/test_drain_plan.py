"""Which VM goes where in a drain (migrate/drain.py): pure Python, no kernel."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from sami_xdp.base.errors import InvalidArgument
from sami_xdp.migrate.drain import plan, read_mapping
from sami_xdp.migrate.peers import Peer, parse_scope
from sami_xdp.migrate.vmset import VmAddrs


def peer(name: str, scope: str) -> Peer:
    return Peer(name, "127.0.0.1:1", b"\0" * 32, parse_scope(scope))


def test_vms_spread_evenly_over_the_peers_whose_scope_holds_them():
    b, c = peer("b", "10.1.0.0/16"), peer("c", "10.1.0.0/16")
    items = plan([f"10.1.1.{i}" for i in range(1, 11)], [b, c])
    assert Counter(i.peer for i in items) == {"b": 5, "c": 5}


def test_a_peer_whose_scope_holds_the_vm_goes_first_else_any():
    b, c = peer("b", "10.1.1.0/24"), peer("c", "10.2.0.0/16")
    items = {i.vms.label: i.peer for i in plan(["10.1.1.1", "10.1.1.2", "10.2.0.1",
                                                 "10.9.9.9"], [b, c])}
    assert items["10.1.1.1"] == items["10.1.1.2"] == "b"
    assert items["10.2.0.1"] == "c"
    assert items["10.9.9.9"] in ("b", "c")  # no scope holds it: the destination decides


def test_the_mapping_wins_and_groups_a_dual_stack_vm(tmp_path: Path):
    b, c = peer("b", "10.1.0.0/16,2001:db8:1::/64"), peer("c", "10.1.0.0/16")
    text = "# vm  peer\n10.1.1.1,2001:db8:1::10  c   # dual stack\n\n"
    mapping = [(v, {"b": b, "c": c}[name]) for v, name in read_mapping(tmp_path, text)]
    items = plan(["10.1.1.1", "2001:db8:1::10", "10.1.1.2"], [b], mapping)
    assert [(i.vms.label, i.peer) for i in items] == [
        (VmAddrs.parse(["10.1.1.1", "2001:db8:1::10"]).label, "c"), ("10.1.1.2", "b")]


def test_without_a_peer_every_vm_needs_a_mapping():
    with pytest.raises(InvalidArgument, match="10.1.1.2 is not in the mapping file"):
        plan(["10.1.1.2"], [])


@pytest.mark.parametrize("text, why", [
    ("10.1.1.1\n", "want 'ADDR"),
    ("10.1.1.1 b extra\n", "want 'ADDR"),
    ("10.1.1.x b\n", ":1:"),
    ("10.1.1.1 b\n10.1.1.1 c\n", "10.1.1.1 is named twice"),
    ("10.1.1.1,10.1.1.1 b\n", ":1:"),
])
def test_a_bad_mapping_line_is_refused_with_its_line_number(tmp_path: Path, text: str,
                                                            why: str):
    with pytest.raises(InvalidArgument, match=why):
        read_mapping(tmp_path / "map", text)
