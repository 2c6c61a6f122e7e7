-- Keyword templates (policyserv's /api/v1/keyword_templates): named programs a
-- community's keyword-template filter runs. Warden's language is a sandboxed Jinja2.
CREATE TABLE keyword_templates (
    name            TEXT PRIMARY KEY,
    body            TEXT NOT NULL,
    -- False for a template imported from policyserv whose Go text/template could not be
    -- translated mechanically: it is kept (original_body) but never runs.
    enabled         BOOLEAN NOT NULL DEFAULT TRUE,
    original_body   TEXT,
    disabled_reason TEXT,
    updated_ts      BIGINT NOT NULL DEFAULT (extract(epoch from now()) * 1000)::bigint
);
