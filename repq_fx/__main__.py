"""``python -m repq_fx``: the ``repq-fx`` command line (:mod:`repq_fx.app.cli`)."""
import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
