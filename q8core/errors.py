"""The one exception type a user ever sees.

Anything the user can fix (a bad path, a malformed TSV row, an unknown task) raises
:class:`Q8Error` with a one-line message that names the problem and where it is. The CLI
prints it as ``q8: error: <message>`` on stderr and exits with status 2; every other
exception is a bug and keeps its traceback.
"""


class Q8Error(Exception):
    """A user-facing error: one line, says what is wrong and where."""

    exit_code = 2
