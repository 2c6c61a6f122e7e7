"""The one-command local stack (``warden dev``): embedded servers and a supervisor.

Nothing here is used in production; the services never import this package.
"""
