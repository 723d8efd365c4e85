# Attack: open file descriptors until the system runs out; contained by RLIMIT_NOFILE (EMFILE).
import os

fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(1_000_000)]
print("PWNED")
