"""python -m prepare: raw text or code -> packed token shards (see prepare.prepare)."""

import sys

from .prepare import main

if __name__ == "__main__":
    sys.exit(main())
