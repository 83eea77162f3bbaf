"""The one base class of the errors a user can fix.

Every entry point (`train.py`, `merge_ckpt.py`, `bookcorpus.py`) catches `UserError`, prints its
message on one line and exits with status 2; anything else is a bug and keeps its traceback. A
message names the file, field or flag at fault and says what to do.
"""


class UserError(ValueError):
    """A problem with what the user gave (a flag, a file, a plan, a dataset): the message names it
    and the fix."""


def read_json(path, error=UserError, fix="fix or replace the file"):
    """The JSON document in `path`; a file that is missing, unreadable or not JSON raises `error`
    (a UserError class) with one line naming the file and `fix`."""
    import json
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{path} not found; {fix}") from None
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise error(f"{path} is not valid JSON ({e}); {fix}") from None
    except OSError as e:
        raise error(f"{path} cannot be read ({e.strerror}); {fix}") from None


def run_cli(main, argv=None, prog=None):
    """main(argv) -> exit status, with every UserError printed as one line ("PROG: error: ...", as
    argparse prints its own) and exit status 2."""
    import sys
    try:
        return main(argv)
    except UserError as e:
        print(f"{prog + ': ' if prog else ''}error: {e}", file=sys.stderr)
        return 2
