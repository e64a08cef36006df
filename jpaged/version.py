"""The package version: read by pyproject.toml (setuptools' `attr:`), `jpaged.__version__`
and the server's OpenAPI document."""
__version__ = "0.1.0"
