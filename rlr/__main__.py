"""``python -m rlr`` = the ``rlr`` command."""
import sys

from .cli import main

sys.exit(main())
