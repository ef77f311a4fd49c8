"""`python -m xmodal ...` (also what `torchrun -m xmodal train ...` runs)."""

from xmodal.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
