"""torchrun for tools/dist_train.sh and tools/dist_test.sh.

Takes exactly ``python -m torch.distributed.run`` arguments. The difference is
on failure: torchrun ends with its own traceback and failure table; this prints
at most one line below the failing process's message and exits with that
process's status. Status 2 (a davit_ext tool refusing its input) and the
statuses of training faults (3, 74, 75: davit_ext.errors.FAULT_STATUSES), whose
one-line message is already printed, add nothing.
"""
import logging
import os
import sys


def main(argv=None):
    from torch.distributed.elastic.multiprocessing.errors import \
        ChildFailedError
    from torch.distributed.run import main as torchrun

    # Agent chatter (closing signals, per-rank failure logs) stays quiet
    # unless LOGLEVEL asks for it.
    if 'LOGLEVEL' not in os.environ:
        for name in list(logging.root.manager.loggerDict):
            if name.startswith('torch.distributed.elastic'):
                logging.getLogger(name).setLevel(logging.CRITICAL)

    from torch.distributed.elastic.multiprocessing.api import SignalException
    try:
        torchrun(sys.argv[1:] if argv is None else argv)
    except SignalException as err:
        # torchrun has passed the signal on to the workers and waited for
        # them (up to 30 s): they said what they did (a davit_ext training
        # saves a checkpoint and stops). Status 128 + signal, as for a shell.
        raise SystemExit(128 + int(err.sigval)) from None
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode
        if code == 2 or code in _fault_statuses():
            raise SystemExit(code) from None
        how = f'was killed by signal {-code}' if code < 0 else \
            f'exited with status {code}'
        print(
            f'error: {err.name} {how} on rank {rank}; its output is above.',
            file=sys.stderr)
        raise SystemExit(code if code > 0 else 1) from None


def _fault_statuses():
    try:
        from davit_ext.errors import FAULT_STATUSES
    except ImportError:  # the launcher also runs other scripts
        return ()
    return tuple(FAULT_STATUSES.values())


if __name__ == '__main__':
    main()
