"""``python -m agent``: the same entry point as the ``scheduled-events-agent`` command."""

import sys

from agent.cli import main

sys.exit(main())
