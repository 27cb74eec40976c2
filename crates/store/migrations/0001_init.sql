-- Portable SQL: runs unchanged on SQLite and PostgreSQL. Times are unix milliseconds (BIGINT),
-- JSON is TEXT, booleans are BIGINT 0/1, ids are text (UUIDv7 or content hashes).

CREATE TABLE policies (
    hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    body TEXT NOT NULL,
    meta TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX policies_by_name ON policies (name, created_at);

CREATE TABLE policy_pins (
    name TEXT PRIMARY KEY,
    hash TEXT NOT NULL REFERENCES policies (hash),
    updated_at BIGINT NOT NULL
);

CREATE TABLE decisions (
    id TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL,
    policy_hashes TEXT NOT NULL,
    policy_names TEXT NOT NULL,
    model_id TEXT NOT NULL,
    effort TEXT NOT NULL,
    prompt_hash TEXT,
    sampling TEXT NOT NULL,
    content TEXT NOT NULL,
    verdicts TEXT NOT NULL,
    outcome TEXT NOT NULL,
    failure_reason TEXT,
    timings TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    cached_prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    source TEXT NOT NULL,
    job_id TEXT UNIQUE,
    replay_of TEXT
);
CREATE INDEX decisions_by_time ON decisions (created_at);
CREATE INDEX decisions_by_outcome ON decisions (outcome, created_at);

CREATE TABLE decision_policies (
    decision_id TEXT NOT NULL REFERENCES decisions (id),
    policy_hash TEXT NOT NULL,
    policy_name TEXT NOT NULL,
    PRIMARY KEY (decision_id, policy_hash)
);
CREATE INDEX decision_policies_by_name ON decision_policies (policy_name);
CREATE INDEX decision_policies_by_hash ON decision_policies (policy_hash);

-- The chain of thought lives apart so that only the audit scope ever reads it.
CREATE TABLE decision_reasoning (
    decision_id TEXT PRIMARY KEY REFERENCES decisions (id),
    reasoning TEXT NOT NULL
);

CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    idempotency_key TEXT UNIQUE,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    lease_token TEXT,
    locked_until BIGINT,
    result_decision_id TEXT,
    error TEXT,
    webhook_url TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX jobs_by_status ON jobs (status, created_at);

CREATE TABLE webhook_deliveries (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    next_at BIGINT NOT NULL,
    last_status BIGINT,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_at);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    scopes TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

-- Placeholder for the human review queue; another component fills in the workflow.
CREATE TABLE reviews (
    id TEXT PRIMARY KEY,
    decision_id TEXT NOT NULL REFERENCES decisions (id),
    status TEXT NOT NULL,
    priority BIGINT NOT NULL,
    reviewer TEXT,
    rationale TEXT,
    rule_id TEXT,
    created_at BIGINT NOT NULL,
    decided_at BIGINT
);
CREATE INDEX reviews_by_status ON reviews (status, priority, created_at);
