"""Errors every layer raises, in one module that imports nothing of arco_jax."""


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and the problem."""
