"""`python -m convc ...` is the `convc` command."""
import sys

from convc.cli import main

if __name__ == "__main__":
    sys.exit(main())
