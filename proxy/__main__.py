"""`python -m proxy` is `pgmux`."""

from proxy.cli import main

main()
