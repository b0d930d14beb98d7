"""The compiled program passes a VM's handshake and drops unsolicited inbound."""

import pytest
from conftest import run_frame

from sami_xdp.policy import protect, sessions, stats
from testbed import packets as P

VM, CLIENT = "10.1.1.1", "192.0.2.10"


@pytest.mark.needs_root
def test_outbound_handshake_then_unsolicited_drop(fw):
    protect.add_protected(fw, "10.1.1.0/24")
    assert run_frame(fw, P.tcp(VM, 40000, CLIENT, 80, P.SYN)) == "PASS"
    assert run_frame(fw, P.tcp(CLIENT, 80, VM, 40000, P.SYN | P.ACK)) == "PASS"
    assert run_frame(fw, P.tcp(VM, 40000, CLIENT, 80, P.ACK)) == "PASS"
    assert run_frame(fw, P.tcp(CLIENT, 5555, VM, 22, P.SYN)) == "DROP"
    rows = sessions.session_records(fw, sessions.read_sessions(fw))
    assert [(r["src"], r["dst"], r["state"]) for r in rows] == [(VM, CLIENT, "ESTABLISHED")]
    counts = stats.verdict_packets(fw)
    assert counts["drop-acl-default"] == 1 and counts["pass-session"] == 2
