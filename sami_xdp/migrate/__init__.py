"""State migration: signed per-VM bundles (DESIGN.md section 3).

Sending side::

    ident = HostIdentity.load(config_dir)
    state = ExportState()                      # one per migration
    mid = new_migration_id()
    data = build_bundle(fw, "10.1.1.1", "host-b", 1, mid, "full", state, identity=ident)
    data = build_bundle(fw, "10.1.1.1", "host-b", 2, mid, "delta", state, identity=ident)
    data = build_bundle(fw, "10.1.1.1", "host-b", 3, mid, "final", state, identity=ident)

Receiving side::

    result = receive_bundle(fw, data, TrustStore.load(config_dir),
                            ReplayCache(state_dir), HostIdentity.load(config_dir).host_id)
    abort_import(fw, mid, state_dir)           # undo every round of that migration

Modules: keys (identity, trust store), select (selection, deltas), wire
(record formats), bundle (container, signing), verify, replay, importer,
acl_bridge (interface to the ACL owner).
"""

from .acl_bridge import AclHooks, AclModuleHooks, acl_records_dtype, default_acl_hooks
from .bundle import Bundle, build_bundle, encode_bundle, new_migration_id, parse_bundle
from .errors import BundleRefused, ImportFailed, MigrateError
from .importer import (
    ImportRecords,
    ImportResult,
    abort_import,
    import_vm_state,
    receive_bundle,
)
from .keys import HostIdentity, Peer, TrustStore
from .replay import ReplayCache
from .select import ExportState, VmState, delta_since, export_vm_state
from .verify import VerifiedBundle, verify_bundle

__all__ = [
    "AclHooks",
    "AclModuleHooks",
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
    "VmState",
    "abort_import",
    "acl_records_dtype",
    "build_bundle",
    "default_acl_hooks",
    "delta_since",
    "encode_bundle",
    "export_vm_state",
    "import_vm_state",
    "new_migration_id",
    "parse_bundle",
    "receive_bundle",
    "verify_bundle",
]
