"""`python -m pyagent` runs the command line."""

from pyagent.cli import main

main()
