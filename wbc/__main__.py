"""`python -m wbc ...` (also what `torchrun -m wbc` runs)."""

from wbc.cli import main

if __name__ == "__main__":
    main()
