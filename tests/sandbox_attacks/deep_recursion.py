# Attack: unbounded recursion with the recursion limit lifted (C-stack overflow or heap exhaustion); contained by
# RLIMIT_AS / the stack limit: the program dies (MemoryError, RecursionError or SIGSEGV), nothing else does.
import sys

sys.setrecursionlimit(10**9)


def down(n):
    return down(n + 1) + 1


print(down(0), "PWNED")
