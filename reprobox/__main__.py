"""`python -m reprobox`."""

from reprobox.cli import entrypoint

entrypoint()
