"""Talking to other Matrix servers.

``resolver`` finds a server (server name resolution), ``network_guard`` refuses
private and other denied addresses at connect time, ``client`` sends signed JSON
requests, ``errors`` says how they failed; keys and X-Matrix live beside them.
Import the submodules directly: this package module stays empty so that importing
one part never drags in the others.
"""
