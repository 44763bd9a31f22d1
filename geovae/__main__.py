"""``python -m geovae`` is the ``geovae`` command."""

import sys

from geovae.cli import main

sys.exit(main())
