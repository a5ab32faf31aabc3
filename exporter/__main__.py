"""``python -m exporter``: the same as the ``dict-rate-limit`` console script."""

import sys

from exporter.cli import main

sys.exit(main())
