"""An operator's typo, anywhere: every command with a matrix of bad values (nan, inf,
huge, negative, wrong text, directories for files, missing files), and every config
file with wrong shapes. Each case must end with one line on stderr, a non-zero exit
that is not the internal-error code, no traceback, and nothing changed: the maps, the
config dir and the state dir are byte for byte as before.

The real entry point (`sami_xdp.cli.main`) runs in-process, in a thread with a
deadline (a bad value that slipped through to `agent` would serve forever)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import typer
from conftest import run_frame

from sami_xdp.base.netutil import ip_to_addr
from sami_xdp.cli import app, main
from sami_xdp.cli.common import INTERNAL_ERROR
from sami_xdp.loader.pinned import Firewall
from sami_xdp.migrate import HostIdentity, ReplayCache, TrustStore, new_migration_id, wire
from sami_xdp.migrate.bundle import FLAG_FINAL, encode_bundle
from sami_xdp.policy import acl, protect
from testbed import packets as P

pytestmark = pytest.mark.needs_root

VM, PREFIX, CLIENT = "10.1.1.1", "10.1.1.0/24", "192.0.2.10"
BAD_FLOAT = ["nan", "inf", "-inf", "-1", "1e309", "1e30", "x", ""]
BAD_INT = ["-1", str(2**64), str(10**30), "1.5", "nan", "x", ""]
# a metrics endpoint: IP:PORT or [IPV6]:PORT, no names; the last one cannot be bound here
BAD_METRICS = ["", "x", "127.0.0.1", "9477", "metrics.example:9477", "::1:9477", "[::1]",
               "127.0.0.1:70000", "[127.0.0.1]:80", "203.0.113.1:9477"]
MAPS = ("sessions", "unassured", "syn_counters", "blacklist", "pickup", "acl_rules", "config")


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Env:
    fw: Firewall
    root: Path
    config: Path
    state: Path
    bundle: Path
    garbage: Path
    port: int
    key_c: str

    def argv(self, *args: str, config: Path | None = None, state: Path | None = None,
             bpffs: Path | None = None) -> list[str]:
        return ["samixdp", "--bpffs", str(bpffs or self.fw.path),
                "--config-dir", str(config or self.config),
                "--state-dir", str(state or self.state), *args]


def run_main(argv: list[str], timeout: float = 30) -> Result:
    """`samixdp ARGV` through the real main(), in-process."""
    out, err = io.StringIO(), io.StringIO()
    box: dict[str, object] = {}

    def target() -> None:
        old = sys.argv
        sys.argv = argv
        try:
            main()
            box["code"] = 0
        except SystemExit as exc:
            box["code"] = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # noqa: BLE001 - reported as a failure below
            box["raised"] = exc
        finally:
            sys.argv = old

    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        th = threading.Thread(target=target, daemon=True)
        th.start()
        th.join(timeout)
    if th.is_alive():
        raise AssertionError(f"{argv[7:]} still runs after {timeout} s (a bad value went through)")
    if "raised" in box:
        raise AssertionError(f"{argv[7:]} raised {box['raised']!r}")
    return Result(int(box["code"]), out.getvalue(), err.getvalue())  # type: ignore[arg-type]


def tree(path: Path) -> dict[str, str]:
    """Every file under `path` (the lock file aside) -> digest of its bytes."""
    out = {}
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    for p in sorted(path.rglob("*")) if path.is_dir() else []:
        if p.is_file() and p.name != "import.lock":
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def state_of(env: Env) -> dict[str, object]:
    maps = {}
    for name in MAPS:
        m = env.fw.maps[name]
        if name == "config":
            maps[name] = m.lookup(np.zeros(1, np.uint32)).tobytes().hex()
            continue
        k, v = m.dump()
        maps[name] = sorted(a.tobytes().hex() + b.tobytes().hex() for a, b in zip(k, v, strict=True))
    maps["protected"] = sorted(str(n) for n in protect.list_protected(env.fw))
    return {"maps": maps, "config": tree(env.config), "state": tree(env.state)}


def refused(env: Env, argv: list[str], mentions: tuple[str, ...] = ()) -> Result:
    before = state_of(env)
    res = run_main(argv)
    shown = f"{argv[7:]} -> {res.code} {res.err!r}"
    assert res.code != 0, shown
    assert res.code != INTERNAL_ERROR, shown
    assert "Traceback" not in res.err + res.out, shown
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("samixdp: error: "), shown
    if mentions:
        assert any(m.lower() in res.err.lower() for m in mentions if m), shown
    assert state_of(env) == before, f"{shown}: something changed"
    return res


@pytest.fixture
def env(fw: Firewall, tmp_path: Path) -> Iterator[Env]:
    protect.add_protected(fw, PREFIX)
    acl.add_rules(fw, [acl.make_rule(fw, vm=VM, proto="tcp", dport="22")])
    for frame in (P.tcp(VM, 40000, CLIENT, 80, P.SYN), P.tcp(CLIENT, 80, VM, 40000, P.SYN | P.ACK),
                  P.tcp(VM, 40000, CLIENT, 80, P.ACK)):
        assert run_frame(fw, frame) == "PASS"
    config, state = tmp_path / "cfg", tmp_path / "state"
    HostIdentity.init(config, "host-a")
    b = HostIdentity.init(tmp_path / "b-cfg", "host-b")
    c = HostIdentity.generate("host-c")
    trust = TrustStore.load(config)
    trust.add("host-b", "127.0.0.1:1", b.public_b64, vms=PREFIX)
    trust.save()
    ReplayCache(state).close()
    rec = np.zeros(1, dtype=wire.SESSION_WIRE)
    rec["addr_lo"], rec["addr_hi"], rec["proto"], rec["state"] = (
        ip_to_addr(VM), ip_to_addr(CLIENT), 6, 3)
    bundle = tmp_path / "good.bundle"
    bundle.write_bytes(encode_bundle({"sessions": rec}, identity=b, vms=[VM],
                                     audience="host-a", seq=1, migration_id=new_migration_id(),
                                     layout_version=fw.const("SAMIXDP_LAYOUT_VERSION"),
                                     flags=FLAG_FINAL, validity_s=3600))
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(os.urandom(4096))
    (tmp_path / "a-dir").mkdir()
    yield Env(fw, tmp_path, config, state, bundle, garbage, 0, c.public_b64)


# ---- every option of every command --------------------------------------------------------


def option_cases(env: Env) -> list[tuple]:
    """(command, baseline argv, option) -> bad values: each case replaces one value of
    a baseline that is otherwise valid (so a value that slipped through would act)."""
    d = str(env.root / "a-dir")
    missing = str(env.root / "no" / "such" / "file")
    out = str(env.root / "out.bundle")
    bundle, garbage = str(env.bundle), str(env.garbage)
    listen = "127.0.0.1:57999"
    return [
        # (baseline, option or argument index, bad values)
        (["attach", "sxnone0"], "--protect",
         ["", "x", "10.1.1.0/33", "256.0.0.0/8", "2001:db8::/129", "::/0", "2001:db8::g/64"]),
        (["attach", "sxnone0"], "--mode", ["", "turbo"]),
        (["attach", "sxnone0"], "--role", ["", "router", "VM"]),
        (["attach", "sxnone0"], "--syn-rate", ["0", "-1", "x", "1e309", str(10**30), "5/m"]),
        (["attach", "sxnone0"], "--ban", [*BAD_INT, "0"]),
        (["attach", "sxnone0"], "--max-sessions", [*BAD_INT, "0"]),
        (["attach", "sxnone0"], "--max-unassured", [*BAD_INT, "0"]),
        (["attach", "IFACE"], "#1", ["", "sxnone0", "x" * 300]),
        (["detach", "IFACE"], "#1", ["", "sxnone0", "x" * 300]),
        (["sessions"], "--vm", ["", "x", "10.1.1.0/24", "300.1.1.1", "2001:db8::/64",
                                "2001:db8::g"]),
        (["sessions"], "--limit", BAD_INT),
        (["events", "--timeout", "0.1"], "--type", ["", ",", "x", "new,x", "NEW,,bogus"]),
        (["events", "--timeout", "0.1"], "--count", [*BAD_INT, "0"]),
        (["events", "--count", "1"], "--timeout", [*BAD_FLOAT, "0"]),
        (["protect", "CIDR"], "#1", ["", "x", "10.1.1.0/40", "2001:db8::/129", "::/0"]),
        (["protect", "CIDR", "--remove"], "#1", ["10.9.9.0/24", "x", "2001:db8:1::/64"]),
        (["export", "--vm", VM, "--to", "host-b", "-o", out], "--vm",
         ["", "x", "8.8.8.8", "10.1.1.0/24"]),
        (["export", "--vm", VM, "--to", "host-b", "-o", out], "--to", ["", "nosuch", "../x"]),
        (["export", "--vm", VM, "--to", "host-b", "-o", out], "-o", [d, missing]),
        (["export", "--vm", VM, "--to", "host-b", "-o", out], "--seq", [*BAD_INT, str(2**32)]),
        (["export", "--vm", VM, "--to", "host-b", "-o", out], "--validity",
         [*BAD_FLOAT, "0", "86401"]),
        (["export", "--vm", VM, "--to", "host-b", "-o", out], "--compress", ["", "lz4"]),
        (["export", "--vm", VM, "--to", "host-b", "-o", out], "--migration-id",
         ["", "xyz", "ab" * 15, "ab" * 17, "zz" * 16]),
        (["import", "FILE"], "#1", [d, missing, garbage, str(env.root / "cfg" / "host.json")]),
        (["import", bundle], "--pickup", [*BAD_FLOAT, "3601"]),
        (["bundle", "inspect", "FILE"], "#2", [d, missing, garbage]),
        (["imports", "abort", "MID"], "#2", ["", "xyz", "ab" * 16, "AB" * 17]),
        (["agent", "--listen", listen], "--listen",
         ["", "x", "127.0.0.1:0", "127.0.0.1:70000", "[::1]:x", "203.0.113.1:7800"]),
        (["agent", "--listen", listen], "--pickup", [*BAD_FLOAT, "3601"]),
        (["agent", "--listen", listen], "--max-message", [*BAD_INT, "0"]),
        (["agent", "--listen", listen], "--timeout", [*BAD_FLOAT, "0"]),
        (["agent", "--listen", listen], "--idle", [*BAD_FLOAT, "0"]),
        (["agent", "--listen", listen], "--handshake-timeout", [*BAD_FLOAT, "0"]),
        (["agent", "--listen", listen], "--max-conns", [*BAD_INT, "0"]),
        (["agent", "--listen", listen], "--max-pending-per-ip", [*BAD_INT, "0"]),
        (["agent", "--listen", listen], "--max-bundles", [*BAD_INT, "0"]),
        (["agent", "--listen", listen], "--metrics", BAD_METRICS),
        (["metrics"], "--listen", BAD_METRICS),
        (["pull", "--vm", VM, "--from", "host-b"], "--vm", ["", "x", "10.1.1.1/24"]),
        (["pull", "--vm", VM, "--from", "host-b"], "--from", ["", "nosuch", "../x"]),
        (["migrate", "--vm", VM, "--peer", "host-b"], "--vm", ["", "x", "8.8.8.8"]),
        (["migrate", "--vm", VM, "--peer", "host-b"], "--peer", ["", "nosuch", "1.2.3.4:5"]),
        (["migrate", "--vm", VM, "--peer", "host-b"], "--rounds", BAD_INT),
        (["migrate", "--vm", VM, "--peer", "host-b"], "--interval", [*BAD_FLOAT, "3601"]),
        (["migrate", "--vm", VM, "--peer", "host-b"], "--source-grace", BAD_FLOAT),
        (["drain", "--peer", "host-b"], "--peer", ["", "nosuch", "1.2.3.4:5"]),
        (["drain", "--peer", "host-b"], "--map", ["/nonexistent/map", "/etc"]),
        (["drain", "--peer", "host-b"], "--vms", ["x", "10.1.1.0/33", "2001:db8::g", ""]),
        (["drain", "--peer", "host-b"], "--parallel", [*BAD_INT, "0", "257"]),
        (["drain", "--peer", "host-b"], "--rounds", BAD_INT),
        (["drain", "--peer", "host-b"], "--interval", [*BAD_FLOAT, "3601"]),
        (["drain", "--peer", "host-b"], "--source-grace", BAD_FLOAT),
        (["migrate-cleanup", "--vm", VM, "--grace", "0", "--max-wait", "0"], "--vm", ["", "x"]),
        (["migrate-cleanup", "--vm", VM, "--grace", "0", "--max-wait", "0"], "--grace",
         BAD_FLOAT),
        (["migrate-cleanup", "--vm", VM, "--grace", "0", "--max-wait", "0"], "--max-wait",
         BAD_FLOAT),
        (["config", "set", "ban", "VALUE"], "#3",
         ["nan", "-1", str(2**64), "1e309", "x", "", "inf"], "ban"),
        (["config", "set", "NAME", "1"], "#2", ["", "nosuch", "timeout.nosuch"], "setting"),
        (["config", "set", "frag-policy", "VALUE"], "#3", ["", "x", "1"], "frag-policy"),
        (["acl", "add", "--vm", VM, "--proto", "tcp", "--dport", "22"], "--vm",
         ["", "x", "8.8.8.8", "10.1.1.1/33", "2001:db8:1::10", "2001:db8::/129"]),
        (["acl", "add", "--vm", VM, "--proto", "tcp", "--dport", "22"], "--proto",
         ["", "sctp", "icmp", "icmpv6"]),
        (["acl", "add", "--vm", VM, "--proto", "tcp", "--dport", "22"], "--dport",
         ["70000", "5-1", "-1", "x", "1-2-3", "1e309"]),
        (["acl", "add", "--vm", VM, "--proto", "tcp", "--dport", "22"], "--src",
         ["x", "1.2.3.4/40", "nan", "2001:db8:99::/48", "::/0", "2001:db8::/129"]),
        (["acl", "add", "--vm", VM, "--proto", "tcp", "--dport", "22"], "--vlan",
         [*BAD_INT, "0", "4095"]),
        (["acl", "add", "--vm", VM, "--proto", "tcp", "--dport", "22"], "--iface",
         ["sxnone0", "x" * 300]),
        (["acl", "add", "--vm", VM, "--proto", "tcp", "--dport", "22"], "--action",
         ["", "reject"]),
        (["acl", "add", "--vm", VM, "--proto", "tcp", "--dport", "22"], "--priority",
         [*BAD_INT, str(2**32)]),
        (["acl", "list"], "--vm", ["x", "10.1.1.0/33", "2001:db8::g"]),
        (["acl", "del", "ID"], "#2", [*BAD_INT, "0", "65536", "12345"], "ID "),
        (["acl", "load", "FILE"], "#2", [d, missing, garbage]),
        (["blacklist", "del", "IP"], "#2",
         ["", "x", "1.2.3.4", "2001:db8:99:1::5", "2001:db8:99::/48", "1.2.3.0/24"]),
        (["blacklist", "add", "IP"], "#2", ["", "x", "1.2.3.0/24", "2001:db8:99::/48",
                                             "2001:db8::g"]),
        (["blacklist", "add", CLIENT], "--seconds", [*BAD_INT, "0", str(2**32 + 1)]),
        (["blacklist", "add", CLIENT], "--vm", ["", "x", "10.1.1.0/24", "2001:db8::/64"]),
        (["peers", "add", "NAME", "--address", "127.0.0.1:7", "--key", env.key_c, "--vms",
          "10.2.0.0/24"], "#2", ["", "-x", "a b", "x" * 40, "host-b"], "peer"),
        (["peers", "add", "host-c", "--address", "127.0.0.1:7", "--key", env.key_c, "--vms",
          "10.2.0.0/24"], "--address", ["", "x", "1.2.3.4", "1.2.3.4:0", "1.2.3.4:99999"],
         "address"),
        (["peers", "add", "host-c", "--address", "127.0.0.1:7", "--key", env.key_c, "--vms",
          "10.2.0.0/24"], "--key", ["", "abc", "A" * 44, "nan"], "public key"),
        (["peers", "add", "host-c", "--address", "127.0.0.1:7", "--key", env.key_c, "--vms",
          "10.2.0.0/24"], "--vms", ["x", "10.0.0.0/33", "10.0.0.0/8,foo", ",,"], "prefix"),
        (["peers", "set-vms", "NAME", "10.1.0.0/16"], "#2", ["", "nosuch"]),
        (["peers", "set-vms", "host-b", "PREFIXES"], "#3", ["x", "10.0.0.0/33", ",,"], "prefix"),
        (["peers", "remove", "NAME"], "#2", ["", "nosuch"]),
        (["apply"], "--file", [d, missing, garbage]),
    ]


def substitute(base: list[str], where: str, value: str) -> list[str]:
    args = list(base)
    if where.startswith("#"):
        args[int(where[1:])] = value
    elif where in args:
        args[args.index(where) + 1] = value
    else:
        args += [where, value]
    return args


def test_every_option_of_every_command_refuses_bad_values(env):
    cases = option_cases(env)
    covered = {(tuple(c[0][:2]) if c[0][0] in SUBGROUPS else (c[0][0],), c[1]) for c in cases}
    missing = [f"{' '.join(c)} {o}" for c, o in every_option() if (c, o) not in covered]
    assert not missing, f"options without bad-value cases: {missing}"
    n = 0
    for base, where, values, *also in cases:
        for value in values:
            argv = env.argv(*substitute(base, where, value))
            mention = where if not where.startswith("#") else value
            refused(env, argv, (mention, value[:20], repr(value)[:20], "invalid value",
                                "missing", "no such", "bundle", "migration id", *also))
            n += 1
    assert not (env.root / "out.bundle").exists()
    assert n > 250, n


SUBGROUPS = {"config", "acl", "blacklist", "keys", "peers", "bundle", "imports"}
FLAGS_ONLY = {"--json", "--help"}


def every_option() -> list[tuple[tuple[str, ...], str]]:
    """(command path, option or #argument index) of every value a command takes."""
    out = []
    root = typer.main.get_command(app)

    def walk(cmd: object, path: tuple[str, ...]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, (*path, name))
            return
        pos = len(path)
        for p in cmd.params:  # type: ignore[attr-defined]
            if getattr(p, "is_flag", False) or p.opts[0] in FLAGS_ONLY:
                continue
            if p.opts[0].startswith("-"):
                out.append((path, p.opts[0]))
            else:
                out.append((path, f"#{pos}"))
                pos += 1

    walk(root, ())
    return [(c, o) for c, o in out if c != ("keys", "init")]  # its own test below


def test_keys_init_refuses_bad_host_ids_and_writes_nothing(env):
    fresh = env.root / "fresh-cfg"
    for value in ["", "-x", "a b", "x" * 40, "höst", "a/b"]:
        refused(env, env.argv("keys", "init", "--host-id", value, config=fresh), (repr(value),))
        assert not fresh.exists() or not any(fresh.iterdir())


def test_bad_global_options(env):
    d, f = env.root / "a-dir", env.garbage
    for argv in (
        env.argv("status", bpffs=d), env.argv("status", bpffs=f),
        env.argv("status", bpffs=env.root / "nosuch"),
        env.argv("import", str(env.bundle), state=f), env.argv("imports", "list", state=f),
        env.argv("imports", "abort", "ab" * 16, state=f),
        env.argv("keys", "show", config=f), env.argv("export", "--vm", VM, "--to", "host-b",
                                                    "-o", str(env.root / "o.b"), config=d),
    ):
        refused(env, argv)


def test_migrate_final_and_abort_without_a_migration(env):
    refused(env, env.argv("migrate", "--vm", VM, "--final"), ("no running migration",))
    refused(env, env.argv("migrate", "--vm", VM, "--abort"), ("no migration of",))
    refused(env, env.argv("migrate", "--vm", VM, "--final", "--abort"), ("exclude",))


# ---- config files and state files of the wrong shape -----------------------------------------


def peers_variants(env: Env) -> list[bytes | None]:
    b = json.loads((env.config / "peers.json").read_text())["peers"][0]
    entry = json.dumps
    return [
        b"[1,2]", b'{"peers": 1}', b'{"peers": [1]}', b'{"peers": [{"name": 1}]}',
        entry({"peers": [{**b, "address": "x"}]}).encode(),
        entry({"peers": [{**b, "public_key": "y"}]}).encode(),
        entry({"peers": [{**b, "vms": "10.0.0.0/8"}]}).encode(),
        entry({"peers": [{**b, "vms": ["x"]}]}).encode(),
        entry({"peers": [{**b, "vms": [7]}]}).encode(),
        entry({"peers": [b, {**b, "name": "host-x"}]}).encode(),  # one key, two names
        b"\xff\xfe\x00garbage", b"", None,  # None: a directory in its place
    ]


def put(path: Path, content: bytes | None) -> None:
    if path.is_dir():
        path.rmdir()
    elif path.exists():
        path.unlink()
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)


def test_config_files_of_the_wrong_shape(env):
    peers, host = env.config / "peers.json", env.config / "host.json"
    key = env.config / "host_key.pem"
    good = {p: p.read_bytes() for p in (peers, host, key)}
    uses = [("peers", "list"), ("export", "--vm", VM, "--to", "host-b", "-o",
                                str(env.root / "o.bundle")), ("import", str(env.bundle)),
            ("bundle", "inspect", str(env.bundle)), ("migrate", "--vm", VM, "--peer", "host-b"),
            ("agent", "--listen", "127.0.0.1:57998")]
    try:
        for content in peers_variants(env):
            put(peers, content)
            for args in uses:
                refused(env, env.argv(*args), ("peers file",))
        put(peers, good[peers])
        for content in (b"[1]", b'{"host_id": 5}', b'{"host_id": "bad id"}', b"\xff", None):
            put(host, content)
            for args in (("keys", "show"), *uses[1:3], uses[5]):
                refused(env, env.argv(*args), ("host",))
        put(host, good[host])
        rsa = (b"-----BEGIN PRIVATE KEY-----\nMIIBVQIBADANBgkqhkiG9w0BAQEFAASCAT8wggE7AgEAAkEA\n"
               b"-----END PRIVATE KEY-----\n")
        for content in (b"garbage", rsa, None):
            put(key, content)
            if content is not None:
                key.chmod(0o600)
            for args in (("keys", "show"), uses[1]):
                refused(env, env.argv(*args), ("host key", "host_key"))
        put(key, good[key])
        key.chmod(0o644)
        refused(env, env.argv("keys", "show"), ("readable by others",))
    finally:
        for p, content in good.items():
            put(p, content)
        key.chmod(0o600)
    assert run_main(env.argv("keys", "show")).code == 0


def test_state_files_of_the_wrong_shape(env):
    mid = "ab" * 16
    cases = {
        env.state / "replay.sqlite": [b"not a database" * 100, b""],
        env.state / "migrations" / mid / "meta.json": [b"[1,2]", b'{"rounds": 1}', b"\xff"],
        env.state / "migrations" / f"{VM}.json": [b"[1,2]", b'{"status": 1}', b"x"],
        env.state / "inflight.npz": [b"not a zip"],
        env.state / "abort.inflight": [b"not hex"],
    }
    uses = {
        "replay.sqlite": [("import", str(env.bundle))],
        "meta.json": [("imports", "list"), ("imports", "abort", mid)],
        f"{VM}.json": [("migrate", "--vm", VM, "--abort"), ("migrate", "--vm", VM, "--final")],
        "inflight.npz": [("protect", PREFIX), ("import", str(env.bundle))],
        "abort.inflight": [("gc",), ("acl", "del", "1")],
    }
    for path, contents in cases.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        for content in contents:
            if path.name == "replay.sqlite" and content == b"":
                continue  # an empty file is a fresh SQLite database
            path.write_bytes(content)
            for args in uses[path.name]:
                refused(env, env.argv(*args), ("state", "replay", "record", "cannot"))
        path.unlink()
        ReplayCache(env.state).close()  # the good one back


def test_acl_rule_files_of_the_wrong_shape(env):
    variants = {
        "a.toml": ['rules = 5', 'rules = [1]', '[[rules]]\nvm = 5', '[[rules]]\nvm = "10.1.1.1"\n'
                   'vlan = "x"', '[[rules]]\nvm = "10.1.1.1"\npriority = "high"',
                   '[[rules]]\nvm = "10.1.1.1"\ndport = [1, 2]', '[[rules]]\nvm = "10.1.1.1"\n'
                   'iface = 5', '[[rules]]\nvm = "10.1.1.1"\nbogus = 1', 'default = "allow"',
                   '[[rules]]\nvm = "10.1.1.1"\nvlan = true', "x = [", "\udcff"],
        "a.yaml": ["- 1", "rules: {a: 1}", "default: allow", "rules: [{vm: 10.1.1.1, 1: 2}]",
                   "rules: [{vm: 10.1.1.1, proto: [tcp]}]", ": :", "rules: [{vm: 8.8.8.8}]"],
    }
    for name, texts in variants.items():
        for text in texts:
            path = env.root / name
            path.write_bytes(text.encode("utf-8", "surrogateescape"))
            refused(env, env.argv("acl", "load", str(path)), (name,))
