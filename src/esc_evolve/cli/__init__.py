"""Command line: parses and dispatches only; the work lives in the stage packages."""
