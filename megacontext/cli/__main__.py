"""``python -m megacontext.cli`` = ``megacontext`` (kept for scripts written before ``python -m megacontext``)."""

import sys

from megacontext.cli import main

sys.exit(main())
