"""``python -m sesame`` is the ``sesame`` command."""

import sys

from sesame.cli import main

sys.exit(main())
