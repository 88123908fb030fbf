"""The one exception type for mistakes a user fixes (bad settings, missing files, wrong input).

The CLI prints its message as one line (no traceback) and exits with status 2; the message names
the setting or file and the fix.
"""


class UserError(Exception):
    """A problem in the user's input, with a message that says how to fix it."""
