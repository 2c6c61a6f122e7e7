"""Filters: one module each, registered in ``warden.filters.registry``."""
