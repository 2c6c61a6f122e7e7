"""How every Warden service starts, reports health, and stops."""
