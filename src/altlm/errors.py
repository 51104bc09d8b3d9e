"""User-facing errors: one class whose message is the single line the CLI prints before exiting with code 2."""


class AltlmError(Exception):
    """Bad input from the user (config, files, model names). The CLI prints `altlm: <message>` and exits 2.

    The message must say what was wrong, where, and what to do.
    """
