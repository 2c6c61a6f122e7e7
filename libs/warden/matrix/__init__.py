"""The Matrix protocol as the policy server speaks it: JSON, events, keys, signatures."""
