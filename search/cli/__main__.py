"""``python -m search.cli``: the ``llm-pruner`` command."""

import sys

from search.cli import main

sys.exit(main())
