"""Research tools that are not part of the installed library (run from the repository: `python -m research...`)."""
