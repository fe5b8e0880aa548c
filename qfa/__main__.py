import sys

from qfa.cli import main

sys.exit(main())
