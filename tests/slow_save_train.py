"""train.py with one checkpoint save held open before its commit: for tests that kill a run mid-save.

    torchrun ... tests/slow_save_train.py --slow_save STEP:SECONDS [train.py flags]

Every rank sleeps SECONDS in the save of step STEP after its shards are written and before
`runtime.checkpoint._commit` (checksums, COMMITTED marker, rename, `last` pointer) runs; every other
save is untouched. torchrun starts each worker on this script, so the patch is in every rank.
"""

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def install(step, seconds):
    from runtime import checkpoint
    commit = checkpoint._commit

    def slow_commit(save_dir, this_step, *args, **kwargs):
        if this_step == step:
            time.sleep(seconds)
        return commit(save_dir, this_step, *args, **kwargs)

    checkpoint._commit = slow_commit


def main(argv=None):
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--slow_save", required=True, help="STEP:SECONDS")
    ours, rest = parser.parse_known_args(argv)
    step, _, seconds = ours.slow_save.partition(":")
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    install(int(step), float(seconds))
    import train
    return train.main(rest)


if __name__ == "__main__":
    sys.exit(main())
