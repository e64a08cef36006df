"""`python -m jpaged ...` runs the `jpaged` command line."""
import sys

from .cli import main

sys.exit(main())
