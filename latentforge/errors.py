"""User-facing errors: each is reported as one line and exit code 2, never a traceback."""


class LatentforgeError(Exception):
    """Bad input from the user (config, CLI argument, run, checkpoint, data file)."""

    exit_code = 2


class ConfigError(LatentforgeError):
    pass


class RunError(LatentforgeError):
    pass


class CheckpointError(LatentforgeError):
    pass


class DataError(LatentforgeError):
    pass


class TrainingStopped(Exception):
    """Training ended early on purpose (unstable loss); the run is marked failed with this reason."""

    exit_code = 1
