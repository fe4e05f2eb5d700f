"""The one error type users see: a single line naming the problem; the CLI exits with code 2."""


class SwarmError(Exception):
    """A problem caused by input (config, flag, model, peer message) rather than a bug."""
