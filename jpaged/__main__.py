"""`python -m jpaged ...` runs the `jpaged` command line."""
import sys

from jpaged.cli.main import main

sys.exit(main())
