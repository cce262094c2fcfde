import sys

from selfforcing.cli import main

sys.exit(main())
