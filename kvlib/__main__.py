"""`python -m kvlib ARGS`: the same CLI as the `kvlib` script, from whichever tree is on sys.path."""

from kvlib.cli.app import main

if __name__ == "__main__":
    main()
