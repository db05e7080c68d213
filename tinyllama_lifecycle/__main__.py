"""python -m tinyllama_lifecycle COMMAND ... : the `tinyllama` console script (see __init__.py)."""

from tinyllama_lifecycle import main

raise SystemExit(main())
