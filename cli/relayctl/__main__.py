"""`python -m cli.relayctl`."""

from cli.relayctl import main

main()
