"""`python -m refusal_cliff.cli`: the same command line as `refusal-cliff`."""

from refusal_cliff.cli import main

main()
