"""`python -m distributed_ebm.cli …`: the `debm` command."""

import sys

from . import main

sys.exit(main())
