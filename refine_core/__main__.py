"""``python -m refine_core ...`` runs the ``refine`` command line (see :mod:`refine_core.cli`)."""

from refine_core.cli import main

raise SystemExit(main())
