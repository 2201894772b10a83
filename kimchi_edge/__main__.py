"""``python -m kimchi_edge`` = the ``kimchi-edge`` command."""

import sys

from kimchi_edge.cli import main

sys.exit(main())
