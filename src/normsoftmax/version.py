"""The package's version, one place for the package and what it writes (exported models, index metadata)."""

__version__ = "0.1.0"
