"""Fixtures shipped with the package for tests (scratch work dirs, fault points)."""
