"""``python -m fieldid`` is the ``fieldid`` command."""
import sys

from fieldid.cli import main

sys.exit(main())
