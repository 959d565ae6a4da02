"""``python -m sharded_msam_sf.simulate``: :func:`sharded_msam_sf.simulate.cli.main`."""
import sys

from .cli import main

sys.exit(main())
