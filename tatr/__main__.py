import sys

from tatr.cli import main

sys.exit(main())
