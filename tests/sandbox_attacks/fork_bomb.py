# Attack: fork bomb. Every process forks forever; contained by the pids cgroup / RLIMIT_NPROC, CPU and wall limits.
import os

while True:
    try:
        os.fork()
    except OSError:
        pass
