"""The exception types a user sees as one message: mistakes a user can make (bad path, bad ratio,
unknown name...: exit status 2) and a job that stopped because its evaluations keep failing (exit
status 1). Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with what the user asked for, explained in one message."""


class JobFailed(Exception):
    """A job stopped on purpose (e.g. its evaluations failed too often); what it finished is kept."""


def require_extra(module: str, extra: str, what: str) -> None:
    """Refuse ``what`` with the install command when the optional ``module`` is missing (the core
    job never needs one)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"{what} needs {module.replace('_', '-')}: pip install 'llm-pruner[{extra}]'")
