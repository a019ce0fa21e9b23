"""The one exception type for mistakes a user can fix (a bad file, key or value).

The CLI prints its message as one line on stderr and exits with code 2, without a traceback;
anything else that escapes is a bug in vmr and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message names the file, key or value at fault."""
