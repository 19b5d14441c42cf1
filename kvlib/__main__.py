"""`python -m kvlib ARGS`: the CLI of this checkout, whatever the console script points at."""

from kvlib.cli.app import main

main()
