"""A second module for tests/test_warm.py: which process it runs in, and whether warm_probe was imported there already."""

import json
import os
import sys

if __name__ == "__main__":
    print(json.dumps({"ppid": os.getppid(), "probe_imported": "warm_probe" in sys.modules}))
