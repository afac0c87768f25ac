"""proseg test suite (a package: helpers are imported as tests.<folder>.<module>)."""
