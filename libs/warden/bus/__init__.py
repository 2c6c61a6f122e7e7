"""NATS: the connection every service shares, and (in ``subjects``) every name on the bus."""
