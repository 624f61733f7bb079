"""Integrations with other libraries (each module imports its library on use only)."""
