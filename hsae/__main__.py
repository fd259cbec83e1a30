"""`python -m hsae` runs the command line (also under torchrun)."""

import sys

from hsae.cli import main

sys.exit(main())
