"""A module for tests/test_warm.py to run through rnnlab.warm: it reports what process it runs in, or waits for a signal."""

import json
import os
import signal
import sys
import time

WARMED_IN = None  # the process whose warm_up() ran for this module, if any


def warm_up() -> None:
    global WARMED_IN
    WARMED_IN = os.getpid()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "report":
        import warm_probe  # the imported module, which a warm server prepared; this file runs as __main__

        print(
            json.dumps(
                {
                    "args": sys.argv[1:],
                    "cwd": os.getcwd(),
                    "probe": os.environ.get("PROBE"),
                    "pid": os.getpid(),
                    "ppid": os.getppid(),
                    "warmed_in": warm_probe.WARMED_IN,
                }
            )
        )
        sys.exit(int(sys.argv[2]))
    signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), sys.exit(143)))
    print(f"ready {os.getpid()}", flush=True)
    time.sleep(60)
