"""`python -m tpas ...` (and `torchrun -m tpas ...`) run the CLI."""

from .cli import main

main()
