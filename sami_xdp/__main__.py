"""`python -m sami_xdp` = the `samixdp` command (used for detached helpers)."""

from .cli import main

main()
