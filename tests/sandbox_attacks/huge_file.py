# Attack: write a 1 GiB file into the working directory; contained by RLIMIT_FSIZE (EFBIG).
block = b"x" * (1 << 20)
with open("big.bin", "wb") as f:
    for _ in range(1024):
        f.write(block)
print("PWNED")
