"""The one exception type for mistakes a user can make (bad path, bad ratio, unknown name...).

The command line prints its message and exits with status 2, without a traceback; everything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with what the user asked for, explained in one message."""
