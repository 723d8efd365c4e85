# Attack: memory bomb in one process (grab 8 GiB in 64 MiB pieces); contained by RLIMIT_AS (MemoryError).
hoard = []
for _ in range(128):
    hoard.append(b"x" * (64 * 2**20))
print("PWNED")
