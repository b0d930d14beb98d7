"""Why a migration step refused or failed, one class per reason.

Every refusal of a bundle is a `BundleRefused`: the message is one line that
names the reason, and nothing in the maps has changed when it is raised.
"""

from __future__ import annotations

from ..base.errors import SamiError


class MigrateError(SamiError):
    """Base of everything raised by sami_xdp.migrate."""


class TransportError(MigrateError):
    """The peer cannot be reached, or the connection failed or timed out."""


class MigrationRefused(MigrateError):
    """The peer refused the migration (preflight or a round), or its answer
    cannot be trusted."""


class TrackSlotsFull(MigrateError):
    """Every slot of the dirty log is taken (by other migrating processes)."""


class ControlError(MigrateError):
    """A signed control message (preflight, ack, abort) was refused."""


# ---- identity and trust (local configuration) --------------------------------


class IdentityError(MigrateError):
    """No or unusable host key / host id in the config dir."""


class TrustStoreError(MigrateError):
    """Bad peers file, unknown peer, malformed public key or address."""


# ---- bundle refusals ------------------------------------------------------------


class BundleRefused(MigrateError):
    """A bundle was not accepted; nothing was written."""

    reason = "refused"


class BundleFormatError(BundleRefused):
    reason = "malformed"


class LayoutVersionError(BundleRefused):
    reason = "layout-version"


class UnknownSignerError(BundleRefused):
    reason = "unknown-signer"


class SignatureError(BundleRefused):
    reason = "bad-signature"


class SignerMismatchError(BundleRefused):
    reason = "signer-mismatch"


class ScopeError(BundleRefused):
    """The bundle's VM is outside the signing peer's scope (peers.json `vms`)."""

    reason = "out-of-scope"


class NotProtectedError(BundleRefused):
    """The bundle's VM is not behind this host (no protected prefix holds it)."""

    reason = "not-protected"


class MigrationConflict(BundleRefused):
    """The bundle does not fit the migration recorded here: another VM or source,
    aborted, or already past its final round."""

    reason = "migration-conflict"


class AudienceError(BundleRefused):
    reason = "wrong-audience"


class ExpiredError(BundleRefused):
    reason = "expired"


class NotYetValidError(BundleRefused):
    reason = "not-yet-valid"


class ReplayError(BundleRefused):
    reason = "replay"


class CountMismatchError(BundleRefused):
    reason = "count-mismatch"


class PoisonedRecordError(BundleRefused):
    """A record names an address other than the header's VM."""

    reason = "foreign-record"


class InvalidRecordError(BundleRefused):
    """A record holds an invalid enum, key or value."""

    reason = "invalid-record"


class CapacityError(BundleRefused):
    reason = "capacity"


class TooLargeError(BundleRefused):
    """The bundle announces more records than this host's maps could ever hold."""

    reason = "too-large"


# ---- failures after verification ------------------------------------------------


class ImportFailed(MigrateError):
    """Loading failed part way; what was written has been rolled back."""

    reason = "load-failed"


class RollbackIncomplete(ImportFailed):
    """Loading failed and the rollback itself failed for some entries."""

    reason = "rollback-incomplete"


class UnknownMigrationError(MigrateError):
    """No import record for this migration id in the state dir."""


class StateDirError(MigrateError):
    """The state dir (replay cache, import journal, migration records) cannot be
    read or written."""
