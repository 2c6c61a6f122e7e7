-- A refusal imported from policyserv for a room v1/v2 event ID ($local:server) comes
-- without the event's content, so it is stored unbound (reference_hash NULL) and bound
-- to the content of the first event asked about under that ID (the filter worker's
-- lookup: UPDATE ... WHERE reference_hash IS NULL). Only refusals may be unbound: an
-- allowed verdict bound on first sight could sign spam under an allowed ID.
ALTER TABLE verdicts ALTER COLUMN reference_hash DROP NOT NULL;
-- NOT VALID: every existing row has a hash; new rows are checked, without a table scan.
ALTER TABLE verdicts ADD CONSTRAINT verdicts_unbound_only_refusals
    CHECK (reference_hash IS NOT NULL OR class = 2) NOT VALID;
