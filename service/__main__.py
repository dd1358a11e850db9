"""``python -m service``: the same as ``fcn-serve``."""

import sys

from service.cli import main

sys.exit(main())
