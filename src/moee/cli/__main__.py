"""`python -m moee.cli ...` (what `torchrun -m moee.cli ...` runs): the `moee` command."""

import sys

from moee.cli import main

sys.exit(main())
