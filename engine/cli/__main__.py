"""`python -m ldlm.cli`: the `ldlm` command, for an environment without its console script."""

import sys

from ldlm.cli import main

sys.exit(main())
