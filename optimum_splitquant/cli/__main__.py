"""``python -m optimum_splitquant.cli``: the ``optimum-splitquant`` command."""

import sys

from .commands import main

sys.exit(main())
