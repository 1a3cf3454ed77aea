"""The package version, in a leaf module so that any module can import it without a circle."""

__version__ = "0.1.0"  # keep in step with pyproject.toml
