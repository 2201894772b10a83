"""Streamlit entry point of the camera demo.

Start it with ``kimchi-edge demo [BUNDLE]``, or directly::

    streamlit run mobile_demo/app.py -- --bundle runs/quickstart/bundle

(``$KIMCHI_EDGE_BUNDLE``, ``$KIMCHI_EDGE_BACKEND`` and ``$KIMCHI_EDGE_DEMO_ICE_SERVERS`` work too.)
"""

import sys
from pathlib import Path

try:
    import mobile_demo  # noqa: F401 - installed (pip install -e .)
except ImportError:  # a plain checkout: the repository root is two levels up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mobile_demo.page import main

main()
