"""``python -m ratequant.cli``: the ``ratequant`` command."""

import sys

from ratequant.cli import main

sys.exit(main())
