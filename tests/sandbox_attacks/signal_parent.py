# Attack: SIGKILL the parent process and the test process (its pid comes in on stdin). Contained: the pid
# namespace hides the test process, the parent is the namespace init (immune), and the uid differs.
import json
import os
import signal
import sys

ctx = json.loads(sys.stdin.read())
try:
    os.kill(os.getppid(), signal.SIGKILL)
except OSError:
    pass
os.kill(ctx["pytest_pid"], signal.SIGKILL)  # raises when contained
print("PWNED")
