"""``python -m scribe_stan``: the ``scribe-stan`` command line (:mod:`scribe_stan.cli`)."""

import sys

from scribe_stan.cli import main

sys.exit(main())
