"""Logs, metrics and traces, the same way in every service."""
