"""``python -m megacontext`` = the ``megacontext`` command."""

import sys

from megacontext.cli import main

sys.exit(main())
