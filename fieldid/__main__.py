"""``python -m fieldid`` is the ``fieldid`` command."""
import sys

from fieldid.cli import main

if __name__ == "__main__":  # importing the module (API docs, tools) runs nothing
    sys.exit(main())
