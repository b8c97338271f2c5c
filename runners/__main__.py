"""`python -m runners <point dir>`: one sweep point in its own process (started by runners.execute)."""

import sys
from pathlib import Path

from runners.child import main

if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
