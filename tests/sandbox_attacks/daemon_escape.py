# Attack: a daemon that outlives the sandbox (double fork + setsid, parent exits at once), then writes a marker
# file into a host directory the sandbox may write to. Contained: the pid namespace / cgroup kills it first.
import json
import os
import sys
import time

ctx = json.loads(sys.stdin.read())
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        for fd in (0, 1, 2):
            os.close(fd)  # do not hold the sandbox's pipes open
        time.sleep(1.0)
        with open(os.path.join(ctx["drop_dir"], "daemon_marker"), "w") as f:
            f.write("I survived")
        os._exit(0)
    os._exit(0)
os.wait()
