"""``python -m fem_anode`` = ``fem-anode``."""

import sys

from fem_anode.cli import main

sys.exit(main())
