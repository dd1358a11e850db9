"""``python -m fcn_client``: the same as ``fcn-segment``."""

import sys

from fcn_client.cli import main

sys.exit(main())
