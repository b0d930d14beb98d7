"""Structure fuzz: bundles with mutated headers, address tables (duplicates, too many,
none, foreign, families mixed), counts, flags, compression, bodies and records of
dual-stack VMs, each correctly re-signed by a trusted peer (so every check after the
signature is reached), fed to verification, and the verified ones to the importer.
The only acceptable outcomes are success or a BundleRefused (a one-line refusal);
anything else is a bug that would kill an agent thread or print a traceback.

SAMIXDP_FUZZ_CASES sets the count (default: 100,000 under CI, 20,000 otherwise;
SAMIXDP_FUZZ_SEED repeats a run). The seed and the count are printed."""

from __future__ import annotations

import os
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import IN_CI, reset_firewall

from sami_xdp.base.layout import load_layout
from sami_xdp.base.netutil import addr_array, ip_to_addr, port_be
from sami_xdp.loader.pinned import Firewall
from sami_xdp.migrate import HostIdentity, ReplayCache, TrustStore, import_vm_state, wire
from sami_xdp.migrate.bundle import (
    COMPRESSIONS,
    FLAG_DELTA,
    FLAG_FINAL,
    HEADER,
    HEADER_SIZE,
    SIG_LEN,
    encode_bundle,
)
from sami_xdp.migrate.errors import BundleRefused
from sami_xdp.migrate.verify import RecordLimits, VerifiedBundle, verify_bundle
from sami_xdp.migrate.vmset import MAX_VM_ADDRS
from sami_xdp.policy import protect

VM, OTHER, CLIENT = "10.1.1.1", "10.1.1.2", "192.0.2.10"
VM6, OTHER6, CLIENT6 = "2001:db8:1::10", "2001:db8:1::11", "2001:db8:99::5"
PREFIXES = ("10.1.1.0/24", "2001:db8:1::/64")
LAYOUT = load_layout().const("SAMIXDP_LAYOUT_VERSION")
CASES = int(os.environ.get("SAMIXDP_FUZZ_CASES", "100000" if IN_CI else "20000"))
IMPORT_CASES = int(os.environ.get("SAMIXDP_FUZZ_IMPORTS", "1500"))
LIMITS = RecordLimits(sessions=1 << 16, syn=4096, blacklist=4096, acl=64)
# addresses a mutated field may take: the VM's, another VM's, clients, edge values, an
# IPv4-mapped and an IPv6 /64 with its interface half set
ADDRS = [VM, VM6, OTHER, OTHER6, CLIENT, CLIENT6, "0.0.0.0", "255.255.255.255", "8.8.8.8",
         "::", "::1", "ff02::1", "fe80::1", "2001:db8:51::", "2001:db8:51::1", "::ffff:0:0",
         "2001:db8:1::"]
WORDS = [int(w) for w in addr_array(ADDRS)["w"].reshape(-1)]
# the VM's address lists a bundle may name (the last ones are refused)
VM_LISTS = [[VM], [VM6], [VM, VM6], [VM6, VM], [VM, OTHER6], [VM, VM6, OTHER, OTHER6],
            [OTHER6], [VM, "8.8.8.8"], [VM, VM], [VM6, "2001:DB8:1::10"]]


def seed() -> int:
    return int(os.environ.get("SAMIXDP_FUZZ_SEED", str(time.time_ns() % 2**32)))


def _of_vm(vm: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Valid records of one of the VM's addresses."""
    v6 = ":" in vm
    client, src = (CLIENT6, "2001:db8:51::") if v6 else (CLIENT, "198.51.100.7")
    n = int(rng.integers(0, 4))
    s = np.zeros(n, dtype=wire.SESSION_WIRE)
    s["addr_lo"], s["addr_hi"] = ip_to_addr(vm), ip_to_addr(client)
    s["port_lo"] = port_be(443)
    s["port_hi"] = [port_be(10000 + i) for i in range(n)]
    s["proto"], s["state"], s["initiator"] = 6, 3, 1
    s["created_age_ms"], s["idle_age_ms"] = 5000, 10
    syn = np.zeros(int(rng.integers(0, 3)), dtype=wire.SYN_WIRE)
    syn["src"], syn["dst"], syn["count"], syn["total"] = ip_to_addr(src), ip_to_addr(vm), 1, 2
    bl = np.zeros(int(rng.integers(0, 3)), dtype=wire.BLACKLIST_WIRE)
    bl["src"], bl["vm"], bl["remaining_ms"] = ip_to_addr(src), ip_to_addr(vm), 9000
    acl = np.zeros(int(rng.integers(0, 3)), dtype=wire.ACL_WIRE)
    acl["vm"], acl["action"], acl["proto"], acl["dport_lo"], acl["dport_hi"] = (
        ip_to_addr(vm), 1, 6, 22, 22)
    d = np.zeros(1, dtype=wire.DEL_SYN_WIRE)
    d["src"], d["dst"] = ip_to_addr(src), ip_to_addr(vm)
    db = np.zeros(1, dtype=wire.DEL_BLACKLIST_WIRE)
    db["src"], db["vm"] = ip_to_addr(src), ip_to_addr(vm)
    return {"sessions": s, "syn": syn, "blacklist": bl, "acl": acl,
            "del_sessions": wire.session_keys_to_del(s[:1]), "del_syn": d, "del_blacklist": db}


def base_sections(rng: np.random.Generator, vms: list[str]) -> dict[str, np.ndarray | bytes]:
    parts = [_of_vm(vm, rng) for vm in vms]
    secs: dict[str, np.ndarray | bytes] = {
        name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    if rng.random() < 0.5:
        for name in ("del_sessions", "del_syn", "del_blacklist"):
            secs.pop(name)
    return secs


def _value(rng: np.random.Generator, dtype: np.dtype, current: int) -> int:
    info = np.iinfo(dtype)
    pool = [0, 1, 2, 3, 6, 7, 8, 17, 31, 32, 33, 58, 96, 120, 127, 128, 129, 191, 192, 193,
            255, 256, 4094, 4095, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1,
            current - 1, current + 1, current * 2, *WORDS, int(rng.integers(0, 2**63))]
    return int(np.clip(pool[int(rng.integers(len(pool)))], info.min, info.max))


def _address(rng: np.random.Generator) -> np.void:
    """An address of the pool, or 16 random bytes."""
    if rng.random() < 0.15:
        return np.frombuffer(rng.bytes(16), dtype=wire.ADDR)[0]
    return ip_to_addr(ADDRS[int(rng.integers(len(ADDRS)))])


def mutate_records(rng: np.random.Generator, secs: dict) -> dict:
    """Random fields of random records set to awkward values; records dropped or doubled."""
    for _ in range(int(rng.integers(1, 4))):
        name = list(secs)[int(rng.integers(len(secs)))]
        arr = secs[name]
        if isinstance(arr, bytes) or not len(arr):
            continue
        arr = arr.copy()
        if rng.random() < 0.15:
            arr = np.concatenate([arr, arr[:1]]) if rng.random() < 0.5 else arr[1:]
        if len(arr):
            field = arr.dtype.names[int(rng.integers(len(arr.dtype.names)))]
            i = int(rng.integers(len(arr)))
            sub = arr[field]
            if sub.dtype == wire.ADDR:  # a whole address, or one of its words
                if rng.random() < 0.7:
                    sub[i] = _address(rng)
                else:
                    w = int(rng.integers(4))
                    sub["w"][i, w] = _value(rng, np.dtype(np.uint32), int(sub["w"][i, w]))
            elif sub.ndim > 1:
                sub[i, int(rng.integers(sub.shape[1]))] = _value(rng, sub.dtype, 0)
            else:
                sub[i] = _value(rng, sub.dtype, int(sub[i]))
        secs[name] = arr
    return secs


def sign(ident: HostIdentity, h: np.ndarray, body: bytes) -> bytes:
    signed = h.tobytes() + body
    return signed + ident.sign(signed)


def mutate_header(rng: np.random.Generator, data: bytes, ident: HostIdentity) -> bytes:
    h = np.frombuffer(data[:HEADER_SIZE], dtype=HEADER).copy()
    body = data[HEADER_SIZE:-SIG_LEN]
    for _ in range(int(rng.integers(1, 4))):
        field = HEADER.names[int(rng.integers(len(HEADER.names)))]
        dt = HEADER.fields[field][0]
        if dt.kind == "V" or dt.kind == "S":
            choices = [b"\0" * dt.itemsize, os.urandom(dt.itemsize), b"host-a", b"host-b",
                       b"\xff\xfe", b"host-a\0x", b"-bad", b"SXMB"]
            raw = choices[int(rng.integers(len(choices)))][: dt.itemsize]
            h[field] = np.frombuffer(raw.ljust(dt.itemsize, b"\0"), dtype=dt)[0]
        else:
            h[field] = _value(rng, dt, int(h[field][0]))
    return sign(ident, h, body)


def _split(data: bytes) -> tuple[np.ndarray, bytes, bytes]:
    """(header, address table, stored body) of a well-formed bundle."""
    h = np.frombuffer(data[:HEADER_SIZE], dtype=HEADER).copy()
    at = HEADER_SIZE + 16 * int(h["n_vms"][0])
    return h, data[HEADER_SIZE:at], data[at:-SIG_LEN]


def mutate_vms(rng: np.random.Generator, data: bytes, ident: HostIdentity) -> bytes:
    """The address table: an address doubled, replaced, dropped, many added (past
    MAX_VM_ADDRS too), all removed, reordered, or a count that disagrees with it."""
    h, table, body = _split(data)
    rows = [table[i : i + 16] for i in range(0, len(table), 16)]
    op = int(rng.integers(7))
    if op == 0:
        rows.insert(int(rng.integers(len(rows) + 1)), rows[int(rng.integers(len(rows)))])
    elif op == 1:
        rows[int(rng.integers(len(rows)))] = _address(rng).tobytes()
    elif op == 2:
        rows.pop(int(rng.integers(len(rows))))
    elif op == 3:
        extra = int(rng.choice([1, 2, MAX_VM_ADDRS - 1, MAX_VM_ADDRS, 100]))
        rows += [_address(rng).tobytes() for _ in range(extra)]
    elif op == 4:
        rows = []
    elif op == 5:
        rows = rows[::-1]
    new = b"".join(rows)
    h["n_vms"] = len(rows)
    if op == 6 or rng.random() < 0.1:  # the header's count and the table disagree
        h["n_vms"] = _value(rng, np.dtype("<u2"), len(rows))
    return sign(ident, h, new + body)


def mutate_body(rng: np.random.Generator, data: bytes, ident: HostIdentity) -> bytes:
    h, table, stored = _split(data)
    body = bytearray(stored)
    op = int(rng.integers(6))
    if op == 0 and body:  # flip bytes
        for _ in range(int(rng.integers(1, 8))):
            body[int(rng.integers(len(body)))] ^= int(rng.integers(1, 256))
    elif op == 1:  # cut or pad
        body = body[: int(rng.integers(len(body) + 1))] if rng.random() < 0.5 else (
            body + os.urandom(int(rng.integers(1, 64))))
    elif op == 2:  # compressed garbage
        body = bytearray(zlib.compress(os.urandom(int(rng.integers(0, 512)))))
        h["compression"] = int(rng.integers(0, 3))
    elif op == 3:  # a small bomb: inflates far past what the header says
        body = bytearray(zlib.compress(b"\0" * int(rng.integers(1, 4 << 20)), 9))
        h["compression"] = 1 + int(rng.integers(0, 2))
    elif op == 4:  # a truncated compressed stream
        z = zlib.compress(bytes(body) or b"x")
        body = bytearray(z[: int(rng.integers(len(z)))])
        h["compression"] = 1
    else:  # sections reordered: the body's halves swapped
        mid = int(rng.integers(len(body) + 1))
        body = body[mid:] + body[:mid]
    if rng.random() < 0.7:  # usually keep the lengths consistent, to get further
        h["body_len"] = len(body)
    return sign(ident, h, table + bytes(body))


def generate(rng: np.random.Generator, ident: HostIdentity) -> tuple[str, bytes]:
    vms = VM_LISTS[int(rng.integers(4))] if rng.random() < 0.85 else VM_LISTS[
        int(rng.integers(len(VM_LISTS)))]
    secs = base_sections(rng, [v for v in vms if v in (VM, VM6)] or [VM])
    kind = ["records", "header", "body", "records+header", "vms", "vms+records"][
        int(rng.integers(6))]
    if "records" in kind:
        secs = mutate_records(rng, secs)
    flags = int(rng.choice([0, FLAG_DELTA, FLAG_FINAL, FLAG_DELTA | FLAG_FINAL]))
    if not flags & FLAG_DELTA:
        for name in ("del_sessions", "del_syn", "del_blacklist"):
            if rng.random() < 0.9:
                secs.pop(name, None)
    if rng.random() < 0.1:
        secs["acl"] = os.urandom(int(rng.integers(0, 40)))
    elif rng.random() < 0.2:
        secs.pop("acl", None)
    acl = secs.get("acl")
    raw = acl if isinstance(acl, bytes) else (acl.tobytes() if acl is not None else b"")
    digest = wire.ruleset_digest(raw) if rng.random() < 0.95 else os.urandom(16)
    data = encode_bundle(
        secs, identity=ident, vms=vms, audience="host-b" if rng.random() < 0.95
        else "host-c", seq=int(rng.integers(1, 5)), migration_id=os.urandom(16),
        layout_version=LAYOUT, flags=flags, acl_digest=digest,
        compression=list(COMPRESSIONS)[int(rng.integers(3))],
        validity_s=float(rng.choice([60, 1, 86400])),
    )
    if "header" in kind:
        data = mutate_header(rng, data, ident)
    elif kind == "body":
        data = mutate_body(rng, data, ident)
    elif "vms" in kind:
        data = mutate_vms(rng, data, ident)
    return kind, data


def run_cases(n: int, check: Callable[[bytes], object], rng: np.random.Generator,
              ident: HostIdentity) -> tuple[Counter, list[str]]:
    outcomes: Counter = Counter()
    bugs: list[str] = []
    for i in range(n):
        kind, data = generate(rng, ident)
        try:
            check(data)
            outcomes["accepted"] += 1
        except BundleRefused as exc:
            outcomes[exc.reason] += 1
        except Exception as exc:  # noqa: BLE001 - what this test looks for
            bugs.append(f"case {i} ({kind}): {type(exc).__name__}: {exc}")
            if len(bugs) > 20:
                break
    return outcomes, bugs


@pytest.fixture(scope="module")
def peer(tmp_path_factory) -> tuple[HostIdentity, TrustStore, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    a = HostIdentity.generate("host-a")
    trust = TrustStore()
    trust.add("host-a", "192.0.2.1:7800", a.public_raw, vms=",".join(PREFIXES))
    return a, trust, root


def test_structure_fuzz_of_resigned_bundles(peer):
    ident, trust, root = peer
    s = seed()
    rng = np.random.default_rng(s)
    t0 = time.monotonic()
    with ReplayCache(root / "state") as rc:
        outcomes, bugs = run_cases(
            CASES, lambda d: verify_bundle(d, trust, "host-b", rc, limits=LIMITS), rng, ident)
    took = time.monotonic() - t0
    print(f"fuzz: {CASES} re-signed bundles, seed {s}, {took:.1f} s; outcomes "
          f"{dict(outcomes.most_common())}")
    assert not bugs, f"seed {s}: " + "\n".join(bugs)
    assert sum(outcomes.values()) == CASES
    assert outcomes["accepted"] > CASES // 50  # the fuzz reaches the end of verification
    assert len(outcomes) > 10  # and many distinct refusals
    # among them those of the VM's addresses: a bad table, one outside the scope, a
    # record of none of them, a record of the wrong family or form
    assert {"malformed", "out-of-scope", "foreign-record", "invalid-record"} <= set(outcomes)


@pytest.mark.needs_root
def test_verified_fuzz_bundles_through_the_importer(peer, firewall_b: Firewall, tmp_path):
    """What verification lets through, the importer loads or refuses, nothing else."""
    ident, trust, _ = peer
    reset_firewall(firewall_b)
    for prefix in PREFIXES:
        protect.add_protected(firewall_b, prefix)
    s = seed()
    rng = np.random.default_rng(s)
    state = tmp_path / "state"
    loaded = 0

    def verify_and_import(data: bytes) -> None:
        nonlocal loaded
        vb: VerifiedBundle = verify_bundle(data, trust, "host-b", rc, limits=LIMITS)
        import_vm_state(firewall_b, vb, state, replay=rc, pickup_s=float(rng.uniform(0, 5)))
        loaded += 1

    with ReplayCache(state) as rc:
        outcomes, bugs = run_cases(IMPORT_CASES, verify_and_import, rng, ident)
    print(f"fuzz through import: {IMPORT_CASES} bundles, seed {s}, {loaded} loaded; "
          f"{dict(outcomes.most_common())}")
    assert not bugs, f"seed {s}: " + "\n".join(bugs)
    assert loaded > IMPORT_CASES // 50
    reset_firewall(firewall_b)
