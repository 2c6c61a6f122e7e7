"""Warden."""
