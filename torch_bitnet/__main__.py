"""``python -m torch_bitnet ...`` runs the ``torch-bitnet`` command (when its script is not on PATH)."""

import sys

from .cli import main

sys.exit(main())
