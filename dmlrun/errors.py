"""Errors a user can cause. The CLI turns them into one message and a non-zero exit."""


class UserError(Exception):
    """A problem with the user's config, data or files, explained in the message."""


class ConfigError(UserError):
    """Settings that cannot work together, found before any data loads."""
