"""`python -m cfdpo ...` (what `accelerate launch -m cfdpo ...` and `torchrun -m cfdpo ...` run)."""

from cfdpo.cli import entry

entry()
