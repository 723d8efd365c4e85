# Attack: sleep forever (no CPU use); contained by the wall-clock limit.
import time

time.sleep(10**6)
print("PWNED")
