"""``python -m medgain.cli``."""

from medgain.cli import main

raise SystemExit(main())
