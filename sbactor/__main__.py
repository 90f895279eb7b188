import sys

from sbactor.cli import main

sys.exit(main())
