"""The package version, in a module of its own so that every layer can read it without importing the
package's facade (``adntn_deploy/__init__.py`` reaches into the top layers)."""

__version__ = "0.1.0"
