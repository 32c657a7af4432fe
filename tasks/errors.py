"""The errors a user can cause, each printed as one line by `tasks.run_cli` (DataError: tasks/sources.py,
ModelError: tasks/models.py)."""


class ConfigError(Exception):
    """A user-caused problem with a flag, the model or a checkpoint: printed as one line, exit code 2."""


class GroupError(Exception):
    """A rank exited or hangs: the run stops with one line (exit code 3); --resume restarts the group."""
