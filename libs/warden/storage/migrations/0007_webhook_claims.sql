-- A claim on a webhook delivery, taken atomically before each POST (security review L10).
--
-- The same event can reach the webhooks service in two JetStream messages (the verdict
-- and its /send re-publication). Without a claim both saw "no final row" and POSTed.
-- The claim names the message that holds it (its stream sequence and delivery number)
-- and lasts until claimed_until (ms): another message does not POST while it is live;
-- a redelivery of the holding message, or anyone after it lapses, may take it over.

ALTER TABLE webhook_deliveries
    ADD COLUMN claim_seq     BIGINT,
    ADD COLUMN claim_attempt INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN claimed_until BIGINT NOT NULL DEFAULT 0;
