"""python -m ichprep: the ichprep command line."""

from .cli import main

main()
