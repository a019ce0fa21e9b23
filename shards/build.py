#!/usr/bin/env python
"""Build WebDataset shards: the same as `vmr shards build` (see shards/README.md).

    python shards/build.py --videos VIDEOS --annotations FILE [FILE ...] --out OUT [options]
"""

import sys

from vmr.cli import main

if __name__ == "__main__":
    sys.exit(main(["shards", "build", *sys.argv[1:]]))
