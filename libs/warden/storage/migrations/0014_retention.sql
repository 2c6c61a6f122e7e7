-- Retention (issue 15): indexes for the pruning queries of warden.storage.retention.
-- Building them blocks verdict inserts for as long as the build takes; on a large table
-- create them first with CREATE INDEX CONCURRENTLY (the same statements), which this
-- migration then finds (IF NOT EXISTS).
--
-- Verdicts whose details (sender, origin, filter outcomes) are still held, oldest
-- first: the detail pruning takes its batches from here. The predicate is the one the
-- pruning query repeats; a pruned row (sender and origin '') leaves the index, so each
-- pass reads only rows it will change, never the pruned history. Imported verdicts have
-- neither (policyserv kept none) and are not in it. Cost on the hot path: one small
-- B-tree entry per new verdict.
CREATE INDEX IF NOT EXISTS verdicts_details_ts ON verdicts (first_seen_ts)
    WHERE sender <> '' OR origin <> '';

-- Every verdict by age, for deleting minimal verdicts (PS_RETENTION_VERDICTS_DAYS, off
-- by default). BRIN: rows arrive in first_seen_ts order, so a summary per block range
-- finds the old ones, and an insert costs next to nothing (ranges are summarised later,
-- by autovacuum).
CREATE INDEX IF NOT EXISTS verdicts_first_seen_brin ON verdicts USING brin (first_seen_ts)
    WITH (autosummarize = on);

-- webhook_deliveries and moderation_actions are pruned through their existing
-- (status, updated_ts) indexes (0003); learned state by room_id, its primary keys'
-- first column.
