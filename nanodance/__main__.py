"""`python -m nanodance ...`: the command line lives in nanodance/tools/cli.py."""
import sys

from nanodance.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
