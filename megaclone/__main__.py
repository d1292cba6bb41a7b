"""``python -m megaclone COMMAND ...``: the same as the installed ``megaclone`` command."""

from megaclone.commands import main

main()
