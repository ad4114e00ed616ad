"""The command line: preflight, one-line errors, the Hydra main, reproduce."""
