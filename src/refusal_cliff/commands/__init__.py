"""CLI command modules: each parses its flags and calls one stage's library functions."""
