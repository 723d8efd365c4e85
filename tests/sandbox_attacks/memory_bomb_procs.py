# Attack: memory bomb spread over 6 processes, each under RLIMIT_AS; contained by the memory cgroup (OOM kill).
import os
import sys

kids = []
for _ in range(6):
    pid = os.fork()
    if pid == 0:
        hoard = [b"x" * (40 * 2**20) for _ in range(4)]  # 160 MiB touched per child
        os._exit(0)
    kids.append(pid)
ok = all(os.waitpid(p, 0)[1] == 0 for p in kids)
if not ok:
    sys.exit("some children were killed")
print("PWNED")
