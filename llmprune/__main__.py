"""``python -m llmprune`` is the ``llmprune`` command."""

import sys

from llmprune.cli import main

sys.exit(main())
