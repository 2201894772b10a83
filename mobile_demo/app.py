"""Streamlit entry point of the camera demo.

Start it with ``kimchi-edge demo [BUNDLE]``, or directly::

    streamlit run "$(python -c "import kimchi_edge.mobile_demo.app as a; print(a.__file__)")" -- --bundle runs/quickstart/bundle

(``$KIMCHI_EDGE_BUNDLE``, ``$KIMCHI_EDGE_BACKEND``, ``$KIMCHI_EDGE_DEMO_ICE_SERVERS`` and ``$KIMCHI_EDGE_ALLOW_UNGATED=1``
work too.)
"""

from kimchi_edge.mobile_demo.page import main

main()
