"""`python -m m2f ...`: the `m2f` command line, for environments whose scripts folder is not on PATH."""

from m2f.cli import main

if __name__ == "__main__":
    main()
