#!/usr/bin/env python3
"""`make mutate`: does the test suite notice when a security rule breaks?

Applies each one-line break listed in tests/mutations.toml to a temporary copy of
the working tree, runs only the tests named for it against that copy (real bcc
compile, real kernel), and prints a table mutation -> killed / survived. Exits 1
if any mutation survives (or cannot be judged), 0 when every one was killed.

    .venv/bin/python scripts/mutate.py              # all of them
    .venv/bin/python scripts/mutate.py --list       # what is in the list
    .venv/bin/python scripts/mutate.py -k acl -j 2  # a subset, two copies at once

Killed means at least one named test *failed*; tests that only error (a mutation
that no longer compiles, a broken fixture) count as "error", not as killed, so a
mutation cannot pass for caught by breaking the build.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIST = REPO / "tests" / "mutations.toml"
TEST_TIMEOUT_S = 600


@dataclass
class Mutation:
    id: str
    file: str
    find: str
    replace: str
    tests: list[str]
    why: str
    outcome: str = ""
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Copy:
    """A private copy of the working tree, with one file mutated at a time."""

    root: Path
    originals: dict[str, str] = field(default_factory=dict)

    def apply(self, m: Mutation) -> None:
        path = self.root / m.file
        text = path.read_text()
        self.originals[m.file] = text
        path.write_text(text.replace(m.find, m.replace, 1))

    def restore(self) -> None:
        for name, text in self.originals.items():
            (self.root / name).write_text(text)
        self.originals.clear()


def load(path: Path) -> list[Mutation]:
    doc = tomllib.loads(path.read_text())
    out = [Mutation(**item) for item in doc.get("mutation", [])]
    ids = [m.id for m in out]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise SystemExit(f"mutate: duplicate ids in {path}: {', '.join(sorted(dup))}")
    return out


def check(m: Mutation) -> str | None:
    """Why the mutation is not a valid one-line break of the current tree (or None)."""
    path = REPO / m.file
    if not path.is_file():
        return f"{m.file} does not exist"
    n = path.read_text().count(m.find)
    if n != 1:
        return f"its text occurs {n} times in {m.file} (must be exactly once)"
    old, new = m.find.splitlines(), m.replace.splitlines()
    if len(old) != len(new) or sum(a != b for a, b in zip(old, new, strict=True)) != 1:
        return "find and replace must differ in exactly one line"
    for t in m.tests:
        if not (REPO / t.split("::")[0]).is_file():
            return f"test file {t.split('::')[0]} does not exist"
    return None


def tracked_files() -> list[str]:
    """Files of the working tree as git sees them (committed or not, ignored excluded)."""
    res = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    )
    return [f for f in res.stdout.decode().split("\0") if f and (REPO / f).is_file()]


def make_copy(dest: Path, files: list[str]) -> Copy:
    for f in files:
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, target)
    return Copy(dest)


def run_tests(copy: Copy, tests: list[str], tag: str) -> tuple[int, int, int, str]:
    """(failed, errors, passed, first failing test) of the named tests on the copy."""
    report = copy.root / f".mutate-{tag}.xml"
    env = {**os.environ, "PYTHONPATH": str(copy.root), "CI": "true"}
    env.pop("SAMIXDP_BPF_DIR", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly",
           "-p", "no:cacheprovider", "--tb=no", "--no-header", f"--junitxml={report}", *tests]
    try:
        subprocess.run(cmd, cwd=copy.root, env=env, capture_output=True,
                       timeout=TEST_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return 0, 1, 0, f"timed out after {TEST_TIMEOUT_S} s"
    if not report.exists():
        return 0, 1, 0, "pytest wrote no report"
    failed = errors = passed = 0
    first = ""
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if "failure" in kinds:
            failed += 1
            first = first or name
        elif "error" in kinds:
            errors += 1
            first = first or name
        elif "skipped" not in kinds:
            passed += 1
    report.unlink()
    return failed, errors, passed, first


def judge(copy: Copy, m: Mutation) -> None:
    t0 = time.monotonic()
    copy.apply(m)
    try:
        failed, errors, passed, first = run_tests(copy, m.tests, m.id)
    finally:
        copy.restore()
    m.seconds = time.monotonic() - t0
    if failed:
        m.outcome, m.detail = "killed", first
    elif errors:
        m.outcome, m.detail = "error", first
    else:
        m.outcome, m.detail = "SURVIVED", f"{passed} tests passed"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("-k", dest="only", default="", help="only ids containing this text")
    ap.add_argument("-j", dest="jobs", type=int, default=1, help="copies run at once")
    ap.add_argument("--json", dest="json_out", type=Path, help="also write results here")
    args = ap.parse_args()

    muts = [m for m in load(LIST) if args.only in m.id]
    if not muts:
        print(f"mutate: no mutation id contains {args.only!r}", file=sys.stderr)
        return 1
    # every anchor is checked first, --list too: a refactor that moved one fails here,
    # in a second, not after a baseline run
    bad = [(m.id, why) for m in muts if (why := check(m))]
    if bad:
        for mid, why in bad:
            print(f"mutate: {mid}: {why}", file=sys.stderr)
        return 1
    if args.list:
        for m in muts:
            print(f"{m.id:36} {m.file:32} {m.why}")
        print(f"{len(muts)} mutations")
        return 0
    if os.geteuid() != 0:
        print("mutate: needs root (the tests load BPF programs): sudo make mutate",
              file=sys.stderr)
        return 1

    t0 = time.monotonic()
    files = tracked_files()
    jobs = max(1, min(args.jobs, len(muts)))
    with tempfile.TemporaryDirectory(prefix="samixdp-mutate-") as tmp:
        copies = [make_copy(Path(tmp) / f"c{i}", files) for i in range(jobs)]
        # the named tests must pass on the unmutated copy, or "killed" means nothing
        union = sorted({t for m in muts for t in m.tests})
        print(f"mutate: {len(muts)} mutations; baseline run of {len(union)} test targets",
              flush=True)
        failed, errors, passed, first = run_tests(copies[0], union, "baseline")
        if failed or errors:
            print(f"mutate: the unmutated tree fails its own tests ({first}): fix that first",
                  file=sys.stderr)
            return 1
        print(f"mutate: baseline {passed} tests passed in {time.monotonic() - t0:.0f} s",
              flush=True)
        todo = list(muts)

        def worker(copy: Copy) -> None:
            while todo:
                try:
                    m = todo.pop(0)
                except IndexError:
                    return
                judge(copy, m)
                print(f"  {m.outcome:8} {m.id} ({m.seconds:.0f} s)", flush=True)

        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(worker, copies))

    width = max(len(m.id) for m in muts)
    print(f"\n{'mutation':{width}}  {'outcome':8}  {'s':>4}  caught by / why")
    for m in muts:
        print(f"{m.id:{width}}  {m.outcome:8}  {m.seconds:4.0f}  {m.detail or m.why}")
    killed = sum(m.outcome == "killed" for m in muts)
    total = time.monotonic() - t0
    print(f"\n{killed}/{len(muts)} killed ({100 * killed / len(muts):.0f}%) in {total:.0f} s")
    if args.json_out:
        args.json_out.write_text(json.dumps(
            {"killed": killed, "total": len(muts), "seconds": round(total, 1),
             "mutations": [{"id": m.id, "file": m.file, "outcome": m.outcome,
                            "seconds": round(m.seconds, 1), "detail": m.detail, "why": m.why}
                           for m in muts]}, indent=2))
    return 0 if killed == len(muts) else 1


if __name__ == "__main__":
    sys.exit(main())
