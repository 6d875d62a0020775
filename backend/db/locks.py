"""Every advisory-lock key of the workers, written once.

The keys share the prefix 7310412 so that the workers' locks read as theirs in
``pg_locks`` beside an application's own.
"""

from __future__ import annotations

# A session lock: one migrator at a time (``backend.db.migration_lock``).
MIGRATIONS = 7_310_412_001
# A transaction lock taken with ``try``: one replica's retention pass at a time
# (``backend.db.upkeep.prune``).
RETENTION = 7_310_412_002
# The seed of ``hashtextextended(queue || chr(31) || key, seed)``: the transaction lock of one
# (queue, key) claim (``backend.db.ledger``). The migrations' number by history; changing it
# would let a worker of the previous release claim a key beside one of this release.
CLAIM_SEED = MIGRATIONS
