# Attack: SIGKILL every pid it can see, then kill(-1). Contained: the pid namespace leaves only the sandbox's own
# processes visible, and the uid differs from every other process; pytest and the parallel sandbox survive.
import os
import signal

me = os.getpid()
killed = []
for pid in range(2, 1 << 16):
    if pid == me:
        continue
    try:
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    except OSError:
        pass
try:
    os.kill(-1, signal.SIGKILL)
except OSError:
    pass
print("PWNED" if killed else "nothing to kill")
