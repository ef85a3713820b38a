"""Importing this module registers the built-in verifiers."""
