"""Trust sources: who may do what policyserv calls a "capability" (today only: post media).

As policyserv's ``trust`` package (reference §3.5), each source answers a tristate for a
(user, room): trusted, untrusted or no opinion. Sources:

* self-directed: the community's ``untrusted_media_filter_allowed_user_globs`` and
  ``..._denied_user_globs`` (deny wins) — ``warden.trust.sources``;
* Muninn Hall: a user whose server is in the Muninn Hall member directory, kept in
  PostgreSQL ``trust_data`` and polled by one worker at a time — ``warden.trust.muninn``;
* creators and power levels: read from Warden's learned room state, which only verified
  PDUs that passed the auth rules and verified snapshots write — ``warden.trust.sources``.

The untrusted-media filter (``warden.filters.untrusted_media``) combines them.
"""
