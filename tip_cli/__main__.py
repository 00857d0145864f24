"""`python -m tip_cli ...` is the `tip` command."""

from tip_cli.cli import main

main()
