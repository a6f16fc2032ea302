"""The exception types a user sees as one message: mistakes a user can make (bad path, bad ratio,
unknown name...: exit status 2) and a job that stopped because its evaluations keep failing (exit
status 1). Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with what the user asked for, explained in one message."""


class JobFailed(Exception):
    """A job stopped on purpose (e.g. its evaluations failed too often); what it finished is kept."""
