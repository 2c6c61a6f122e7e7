"""``python -m warden`` is the ``warden`` command."""

import sys

from warden.cli import main

sys.exit(main())
