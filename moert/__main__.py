import sys

from moert.cli import main

sys.exit(main())
