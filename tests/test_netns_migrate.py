"""Issue 4 integration: two firewall hosts with real agents on the demo topology, the VM
dual-stack (`migrate --vm 10.1.1.1 --vm 2001:db8:1::10`: one migration of both).

Runs the demo driver with few connections: the control run (the VM moves with no
state migration) must break connections, which proves the check can fail; the
migrated run (signed bundles through B's agent, then the move) must break none."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from netns import require_root

from testbed.netns import REPO, unique_suffix

pytestmark = [pytest.mark.netns, pytest.mark.needs_root]


def test_connections_survive_only_with_migration(tmp_path: Path) -> None:
    require_root()
    out = tmp_path / "demo"
    res = subprocess.run(
        [sys.executable, REPO / "scripts" / "demo_migrate.py", "--conns", "20",
         "--duration", "9", "--settle", "3", "--out", out, "--suffix", unique_suffix()[:5]],
        capture_output=True, text=True, timeout=240,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    doc = json.loads((out / "demo.json").read_text())
    runs = {r["name"]: r for r in doc["runs"]}
    control, migrated = runs["control"], runs["migrated"]
    assert control["broken"] == control["conns"] == 20
    assert control["b_drops"].get("drop-no-session", 0) > 0
    assert migrated["broken"] == 0 and migrated["alive"] == 20
    assert not migrated["b_drops"], migrated["b_drops"]
    mig = migrated["migration"]
    assert mig["outcome"] == "completed"
    names = [p["name"] for p in mig["phases"]]
    assert names[0] == "preflight" and names[1] == "full copy" and names[-1] == "final delta"
    assert mig["vms"] == ["10.1.1.1", "2001:db8:1::10"]  # one migration, both addresses
    full = mig["phases"][1]
    assert full["imported"]["sessions"] + full["imported"]["unassured"] >= 20
    assert full["imported"]["acl_rules"] == 2  # each address's ACL rule travelled with it
    assert (out / "timeline.png").stat().st_size > 10_000
