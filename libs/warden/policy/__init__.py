"""The policy model: verdicts, content classes, harm IDs, community configuration."""
