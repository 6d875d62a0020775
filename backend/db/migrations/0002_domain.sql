-- Dragonfly's domain: plaintiffs hold judgments against debtors; enforcement cases
-- record actions (events) and evidence; the collectability worker keeps one score per
-- judgment and the escalation worker appends recommendations, once per job key.
CREATE SCHEMA IF NOT EXISTS dragonfly;

CREATE TABLE IF NOT EXISTS dragonfly.plaintiffs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id      text NOT NULL CHECK (org_id <> ''),
    name        text NOT NULL CHECK (name <> ''),
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS plaintiffs_org_idx ON dragonfly.plaintiffs (org_id);

CREATE TABLE IF NOT EXISTS dragonfly.debtors (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id      text NOT NULL CHECK (org_id <> ''),
    name        text NOT NULL CHECK (name <> ''),
    state       char(2),
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS debtors_org_idx ON dragonfly.debtors (org_id);

CREATE TABLE IF NOT EXISTS dragonfly.judgments (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id         text NOT NULL CHECK (org_id <> ''),
    plaintiff_id   bigint NOT NULL REFERENCES dragonfly.plaintiffs (id),
    debtor_id      bigint NOT NULL REFERENCES dragonfly.debtors (id),
    amount         numeric(14, 2) NOT NULL CHECK (amount > 0),
    judgment_date  date NOT NULL,
    case_number    text,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS judgments_org_idx ON dragonfly.judgments (org_id);
CREATE INDEX IF NOT EXISTS judgments_plaintiff_idx ON dragonfly.judgments (plaintiff_id);
CREATE INDEX IF NOT EXISTS judgments_debtor_idx ON dragonfly.judgments (debtor_id);

-- The current score only: each scoring run overwrites the row of its judgment.
CREATE TABLE IF NOT EXISTS dragonfly.collectability_scores (
    judgment_id  bigint PRIMARY KEY REFERENCES dragonfly.judgments (id) ON DELETE CASCADE,
    score        smallint NOT NULL CHECK (score BETWEEN 0 AND 100),
    tier         char(1) NOT NULL CHECK (tier IN ('A', 'B', 'C')),
    reason       text NOT NULL,
    scored_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    job_key      text
);
CREATE INDEX IF NOT EXISTS collectability_scores_tier_idx
    ON dragonfly.collectability_scores (tier, score DESC);

CREATE TABLE IF NOT EXISTS dragonfly.enforcement_cases (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id            text NOT NULL CHECK (org_id <> ''),
    judgment_id       bigint NOT NULL REFERENCES dragonfly.judgments (id),
    status            text NOT NULL DEFAULT 'open'
        CHECK (status IN ('open', 'paused', 'closed')),
    opened_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_activity_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    closed_at         timestamptz,
    CHECK ((status = 'closed') = (closed_at IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS enforcement_cases_judgment_idx
    ON dragonfly.enforcement_cases (judgment_id);
CREATE INDEX IF NOT EXISTS enforcement_cases_org_status_idx
    ON dragonfly.enforcement_cases (org_id, status, last_activity_at);

CREATE TABLE IF NOT EXISTS dragonfly.enforcement_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    case_id     bigint NOT NULL REFERENCES dragonfly.enforcement_cases (id) ON DELETE CASCADE,
    event_type  text NOT NULL CHECK (event_type IN (
        'garnishment', 'levy', 'skiptrace_refresh', 'attorney_review',
        'recommendation', 'payment', 'note')),
    details     jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(details) = 'object'),
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    job_key     text
);
-- Escalation reads a case's recent events (attempts in the last 30 days, last activity).
CREATE INDEX IF NOT EXISTS enforcement_events_case_idx
    ON dragonfly.enforcement_events (case_id, created_at);
-- A job inserts its event at most once, whatever the number of deliveries.
CREATE UNIQUE INDEX IF NOT EXISTS enforcement_events_job_key_idx
    ON dragonfly.enforcement_events (job_key) WHERE job_key IS NOT NULL;

CREATE TABLE IF NOT EXISTS dragonfly.evidence (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    case_id     bigint NOT NULL REFERENCES dragonfly.enforcement_cases (id) ON DELETE CASCADE,
    kind        text NOT NULL CHECK (kind IN (
        'bank_account', 'employer', 'property', 'vehicle', 'address', 'document')),
    description text,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS evidence_case_idx ON dragonfly.evidence (case_id);
