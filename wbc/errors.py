"""One exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class WbcError(Exception):
    """A problem the user can act on (bad input, stale artefact, wrong option).

    The message must say what is wrong and what to do; the CLI shows it without a traceback.
    """
