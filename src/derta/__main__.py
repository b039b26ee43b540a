"""`python -m derta`: the `derta` command."""

import sys

from derta.cli.main import main

sys.exit(main())
