"""Helpers shared by the tests: ports, bounded waits, real services and peers, shared data."""
