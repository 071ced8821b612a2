"""Every exception davit_ext raises on purpose, in one place.

Each message says what is wrong, where, and what to do; the tools print it
alone (no traceback) and exit with status 2 (:data:`USER_ERRORS`). This module
imports nothing from davit_ext, so every layer may raise these, the model
included.
"""
from typing import List, Tuple

__all__ = [
    'CheckpointError', 'CheckpointNotFoundError', 'UnsafeCheckpointError',
    'CorruptCheckpointError', 'CheckpointIntegrityError',
    'CheckpointDownloadError', 'CheckpointMismatchError',
    'CheckpointStateError', 'UnsupportedTorchError', 'UnknownSchemeError',
    'UnknownLayoutError', 'UnmappedKeysError', 'ConfigError',
    'DatasetNotFoundError', 'LauncherError', 'NothingToResume',
    'TrainingFault', 'NonFiniteLossError', 'UnreadableImageError',
    'CheckpointSaveError', 'Preempted', 'USER_ERRORS', 'FAULT_STATUSES'
]

# ------------------------------------------------------------- checkpoints


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path (or table name) does not exist."""


class UnsafeCheckpointError(CheckpointError):
    """The file pickles an object outside the allowlist (nothing ran)."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated, damaged, or not a torch checkpoint."""


class CheckpointIntegrityError(CheckpointError):
    """A file's sha256 does not match the hash known for it."""


class CheckpointDownloadError(CheckpointError):
    """A URL could not be downloaded (offline, unreachable, HTTP error)."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's keys or shapes do not fit the model."""


class CheckpointStateError(CheckpointError):
    """A checkpoint lacks the training state that resuming needs."""


class UnsupportedTorchError(CheckpointError):
    """Torch is too old for safe (``weights_only``) loading."""


class UnknownSchemeError(CheckpointError):
    """A checkpoint scheme davit_ext does not serve safely."""


# ------------------------------------------------------- state-dict layouts


class UnknownLayoutError(ValueError):
    """A state dict is in none of the known DaViT layouts."""


class UnmappedKeysError(KeyError):
    """Some keys of a state dict fit no rule of the conversion."""

    def __init__(self, src: str, dst: str, keys: List[str]) -> None:
        shown = ', '.join(keys[:20]) + (' ...' if len(keys) > 20 else '')
        super().__init__(
            f'{len(keys)} key(s) of the {src} DaViT state dict have no {dst} '
            f'equivalent: {shown}')
        self.keys = keys

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


# ------------------------------------------------------------------ tools


class ConfigError(ValueError):
    """The config or a command-line option cannot work as given."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's root, annotation file or image folder does not exist."""


class LauncherError(RuntimeError):
    """The launcher's environment is missing; says how to start the job."""


class NothingToResume(ConfigError):
    """A resume found nothing left to train (``tools/train.py.

    --resume-finished-ok`` makes that exit status 0).
    """


# ----------------------------------------------------------- training faults


class TrainingFault(RuntimeError):
    """A run stopped on purpose; the message says what happened and what to do.
    The tools print it as one line and exit with :attr:`exit_status`.

    Takes one message argument only: torch's DataLoader re-raises an error of a
    worker process as ``type(err)(text)``, with the worker's traceback in the
    text; the original message is recovered from it.
    """
    exit_status = 1
    #: What the tools print before the message.
    prefix = 'error: '

    def __init__(self, message: str) -> None:
        marker = f'{type(self).__name__}: '
        if 'Original Traceback' in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class NonFiniteLossError(TrainingFault):
    """The loss (or the weights) stopped being finite."""
    exit_status = 3


class UnreadableImageError(TrainingFault):
    """An image of a dataset cannot be read or decoded."""
    exit_status = 2


class CheckpointSaveError(TrainingFault):
    """A checkpoint could not be written (the previous one is intact)."""
    exit_status = 74  # sysexits.h EX_IOERR


class Preempted(TrainingFault):
    """A stop signal arrived; a resumable checkpoint was saved."""
    exit_status = 75  # sysexits.h EX_TEMPFAIL: try again (--resume)
    prefix = 'stopped: '


#: Exit status of each fault, for launchers and job scripts.
FAULT_STATUSES = {
    cls.__name__: cls.exit_status
    for cls in (NonFiniteLossError, UnreadableImageError, CheckpointSaveError,
                Preempted)
}

#: What the tools print as one line and turn into exit status 2.
USER_ERRORS: Tuple[type, ...] = (CheckpointError, LauncherError,
                                 DatasetNotFoundError, ConfigError,
                                 UnknownLayoutError, UnmappedKeysError)
