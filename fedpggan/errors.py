"""User-facing errors.

Every problem a user can fix (a bad option, a missing file, a broken dataset) raises
:class:`FedPGGANError` with one line that names the problem and the fix. The CLI prints
that line and exits non-zero; ``--debug`` shows the traceback.
"""


class FedPGGANError(Exception):
    """A problem the user can fix, described in one line (what is wrong, and how to fix it).

    ``shared``: at a hospital site, what its ClientApp tells the coordinator instead, when the
    message names what stays at the site (its other studies); the site's own log keeps the message."""

    def __init__(self, message: str, shared: str | None = None) -> None:
        super().__init__(message)
        self.shared = shared
