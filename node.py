#!/usr/bin/env python3
"""Entry point of a swarm node: ``python node.py --help``."""
import sys

from swarm.cli import main

if __name__ == "__main__":
    sys.exit(main())
