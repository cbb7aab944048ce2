"""The package version, read by the build (pyproject.toml) and by ``markov_rsa.__version__``."""

__version__ = "0.1.0"
