"""``python -m tlmicroscope``: the ``tlmicroscope`` command (as ``torchrun -m tlmicroscope``)."""

import sys

from tlmicroscope.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
