"""`python -m pagetron.backend.cli ...`: the `pagetron` command."""

import sys

from pagetron.backend.cli import main

sys.exit(main())
