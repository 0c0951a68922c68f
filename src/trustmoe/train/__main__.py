"""`python -m trustmoe.train ...` (what torchrun launches): the same options as `trustmoe train`."""

import sys

from trustmoe.cli import main  # the entry point shim is the one place allowed to import cli

if __name__ == "__main__":
    sys.argv.insert(1, "train")
    main()
