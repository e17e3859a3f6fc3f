"""``python -m repq_fx``: the ``repq-fx`` command line."""
import sys

from .cli import main

sys.exit(main())
