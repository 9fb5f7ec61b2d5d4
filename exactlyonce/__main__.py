"""``python -m exactlyonce``: the same as the ``exactlyonce`` command."""

import sys

from exactlyonce.cli import main

sys.exit(main())
