"""`python -m worker.cli`: the same as the `imgprep` command."""

from worker.cli import main

main()
