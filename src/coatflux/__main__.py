"""``python -m coatflux ...``: the same as the ``coatflux`` command (for ``torchrun -m`` and ``accelerate launch -m``)."""

import sys

from coatflux.cli import main

sys.exit(main())
