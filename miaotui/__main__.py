"""`python -m miaotui ...` (what `torchrun -m miaotui ...` runs on every rank)."""
import sys

from miaotui.cli import main

sys.exit(main())
