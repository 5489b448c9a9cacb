"""``python -m enginekit.app.cli``."""

from enginekit.app.cli import main

main()
