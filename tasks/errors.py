"""The errors a user can cause, each printed as one line by `tasks.run_cli` (tasks/runfiles.py): a bad flag or
checkpoint, a bad data file or record, a model that cannot be loaded, and a lost torchrun rank."""


class ConfigError(Exception):
    """A user-caused problem with a flag, the model or a checkpoint: printed as one line, exit code 2."""


class DataError(Exception):
    """A user-caused data problem (missing file, malformed record, unknown name, impossible split): one line, exit 2."""


class ModelError(Exception):
    """An unknown model, a missing weights package, a model that does not fit the task: one line, exit 2."""


class GroupError(Exception):
    """A rank exited or hangs: the run stops with one line (exit code 3); --resume restarts the group."""
