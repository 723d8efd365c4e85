# Attack: gigabytes on stdout; contained by the output cap (the sandbox stops reading and kills the program).
import sys

block = "x" * (1 << 20)
for _ in range(4096):
    sys.stdout.write(block)
print("PWNED")
