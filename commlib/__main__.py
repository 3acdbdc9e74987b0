import sys

from commlib.cli import main

sys.exit(main())
