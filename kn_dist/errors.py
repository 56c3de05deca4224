"""The one exception type that means "the user gave us something we cannot use".

The CLI turns it into a single line on stderr and exit code 2; everything else is a bug and keeps
its traceback. It subclasses ValueError so library callers can catch it the usual way.
"""


class UserError(ValueError):
    """Bad input from a person: a config key, a file, a URI, a geometry. The message is one sentence
    that names the value and says what would be valid."""
