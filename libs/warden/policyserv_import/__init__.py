"""``warden import-policyserv``: carry a policyserv database over to Warden.

See ``importer`` for what is imported and how; docs/moving-from-policyserv.md
section for the operator's steps.
"""

from warden.policyserv_import.importer import (
    ImportReport,
    SourceError,
    TargetError,
    run_import,
)

__all__ = ["ImportReport", "SourceError", "TargetError", "run_import"]
