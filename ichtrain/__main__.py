"""python -m ichtrain: the ichtrain command line (also usable as `torchrun -m ichtrain train ...`)."""

from .cli import main

main()
