"""HMA media scanning: download media once, hash and match it with HMA, judge per community.

``extract`` finds an event's media (mxc URIs), ``download`` fetches them through the
homeserver's authenticated media API behind the connect-time network guard, ``hma``
speaks the Hasher-Matcher-Actioner API, and ``scanner`` ties them together with the
caches (PostgreSQL ``media_hashes`` shared by every community, ``media_classifications``
per community) and the single-flight that makes one download serve every asker.
"""
