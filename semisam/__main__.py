"""``python -m semisam``: the ``semisam`` command."""

import sys

from semisam.cli import main

sys.exit(main())
