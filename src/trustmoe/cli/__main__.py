"""`python -m trustmoe.cli` runs the command line."""

from trustmoe.cli import main

main()
