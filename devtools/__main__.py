"""`python -m devtools run|demo`: see devtools.run."""

import sys

from devtools.run import main

sys.exit(main())
