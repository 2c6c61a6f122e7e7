"""Harm IDs (MSC4456 namespace), as sent in ``org.matrix.msc4387.harms``."""

from __future__ import annotations

from typing import Final

NS: Final = "org.matrix.msc4456"

SPAM: Final = f"{NS}.spam"
SPAM_FRAUD: Final = f"{NS}.spam.fraud"
SPAM_IMPERSONATION: Final = f"{NS}.spam.impersonation"
SPAM_FLOODING: Final = f"{NS}.spam.flooding"
HARASSMENT: Final = f"{NS}.harassment"
CHILD_SAFETY_CSAM: Final = f"{NS}.child_safety.csam"
TOS_BAN_EVASION: Final = f"{NS}.tos.ban_evasion"
OTHER: Final = f"{NS}.other"

# policyserv's own IDs, kept for compatibility.
MEDIA: Final = "org.matrix.policyserv.media"
SPEC_NON_COMPLIANCE: Final = "org.matrix.policyserv.spec_non_compliance"

# Every harm ID Warden emits or accepts from a keyword template.
KNOWN_HARMS: Final = frozenset(
    {
        SPAM,
        SPAM_FRAUD,
        SPAM_IMPERSONATION,
        SPAM_FLOODING,
        HARASSMENT,
        CHILD_SAFETY_CSAM,
        TOS_BAN_EVASION,
        OTHER,
        MEDIA,
        SPEC_NON_COMPLIANCE,
    }
)

HARMS_FIELD: Final = "org.matrix.msc4387.harms"
