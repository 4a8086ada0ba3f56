"""``python -m vmiso``: the same as the ``vmiso`` command."""
import sys

from .cli.main import main

sys.exit(main())
