import sys

from qfa.cli import entry

sys.exit(entry())
