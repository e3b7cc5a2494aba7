"""The one exception users see: a one-line message naming the file, row id or option at fault."""


class LvlmlpError(Exception):
    """A user-facing error. The CLI prints `lvlmlp: error: <message>` on stderr and exits with status 2."""
