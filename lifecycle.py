"""The `tinyllama` front door under its checkout name: `python -m lifecycle ...` = `tinyllama ...`.

The dispatcher itself is tinyllama_lifecycle/ (the console script's entry point), which an installed
wheel also carries; this file is not installed.
"""

from tinyllama_lifecycle import CORE, STAGES, main, usage  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
