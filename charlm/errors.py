"""The user-error type: anything a user can fix (bad config, bad file, bad option).

The CLI turns a UserError into one line on stderr and exit code 2; everything else is a bug.
"""


class UserError(Exception):
    """A mistake the user can fix; its message names the problem and what to do."""
