"""A module for tests/test_warm.py to run through rnnlab.warm: it reports what process it runs in, or waits for a signal."""

import json
import os
import signal
import sys
import time

if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "report":
        print(
            json.dumps(
                {"args": sys.argv[1:], "cwd": os.getcwd(), "probe": os.environ.get("PROBE"), "pid": os.getpid(), "ppid": os.getppid()}
            )
        )
        sys.exit(int(sys.argv[2]))
    signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), sys.exit(143)))
    print(f"ready {os.getpid()}", flush=True)
    time.sleep(60)
