"""State migration, host to host (DESIGN.md section 3).

Sending side (a VM is all its addresses: one bundle a round holds them all)::

    ident = HostIdentity.load(config_dir)
    vm = VmAddrs.parse(["10.1.1.1", "2001:db8:1::10"])
    state = ExportState()                      # one per migration
    mid = new_migration_id()
    data = build_bundle(fw, vm, "host-b", 1, mid, "full", state, identity=ident)
    data = build_bundle(fw, vm, "host-b", 2, mid, "delta", state, identity=ident)
    data = build_bundle(fw, vm, "host-b", 3, mid, "final", state, identity=ident)

Receiving side::

    result = receive_bundle(fw, data, TrustStore.load(config_dir),
                            ReplayCache(state_dir), HostIdentity.load(config_dir).host_id)
    abort_import(fw, mid, state_dir)           # undo every round of that migration

Modules, bottom up: errors; vmset (a VM's addresses); keys (this host's
identity); peers (trusted peers and their scopes); wire (record codecs); bundle
(the signed container); describe (records as text); select (a VM's state,
deltas); export (select + encode one round); verify; replay (replay cache,
control nonces); journal (the import journal), undo (undo records) and recovery
(after a crash); plan (what a round touches, capacity); importer; fields and
control (signed control messages); tlsid (TLS bound to the host keys) and
transport (frames, deadlines); phases (the source's pre-copy phases); running (a
migration as the operator runs it); agent (the destination's server).
"""

from .bundle import Bundle, encode_bundle, new_migration_id, parse_bundle
from .errors import BundleRefused, ImportFailed, MigrateError
from .export import build_bundle
from .importer import ImportResult, abort_import, import_vm_state, receive_bundle
from .journal import ImportRecords
from .keys import HostIdentity
from .peers import Peer, TrustStore
from .replay import ReplayCache
from .select import ExportState, VmState, delta_since, export_vm_state
from .verify import VerifiedBundle, verify_bundle
from .vmset import VmAddrs

__all__ = [
    "Bundle",
    "BundleRefused",
    "ExportState",
    "HostIdentity",
    "ImportFailed",
    "ImportRecords",
    "ImportResult",
    "MigrateError",
    "Peer",
    "ReplayCache",
    "TrustStore",
    "VerifiedBundle",
    "VmAddrs",
    "VmState",
    "abort_import",
    "build_bundle",
    "delta_since",
    "encode_bundle",
    "export_vm_state",
    "import_vm_state",
    "new_migration_id",
    "parse_bundle",
    "receive_bundle",
    "verify_bundle",
]
