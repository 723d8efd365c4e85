# Attack: start threads forever; contained by the pids cgroup / RLIMIT_NPROC / RLIMIT_AS ("can't start new thread").
import threading
import time

threads = []
for _ in range(100_000):
    t = threading.Thread(target=time.sleep, args=(60,), daemon=True)
    t.start()
    threads.append(t)
print("PWNED")
