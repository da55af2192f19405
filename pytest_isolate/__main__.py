"""``python -m pytest_isolate`` is the ``pytest-isolate`` command line."""

import sys

from pytest_isolate.cli import main

sys.exit(main())
