"""`python -m xentools` runs the CLI."""
from xentools.tools.cli import main

main()
