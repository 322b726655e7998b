"""``python -m longtail`` (what ``torchrun -m longtail`` runs): the command line."""

from longtail.entry import main

main()
