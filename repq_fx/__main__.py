"""``python -m repq_fx``: the ``repq-fx`` command line."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
