-- Rollbacks (expand step): each contract step records the oldest schema of code it leaves
-- working (the N of its "after every live worker runs schema N"), so that a release older
-- than that refuses to boot on it, in one line, instead of crashing on its first claim.
-- Null: an expand step, which every release survives. Migrate fills it in from their
-- directives for the contract steps applied before this column existed (0007). Nullable
-- and without a default: adding it rewrites nothing.
ALTER TABLE workers.schema_migrations ADD COLUMN IF NOT EXISTS requires_schema integer;
