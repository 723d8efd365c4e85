# Control (not an attack): writes the marker into the shared drop directory at once. It proves that the channel
# the daemon attack would use is writable from the sandbox, so "no daemon marker" is a real observation.
import json
import os
import sys

ctx = json.loads(sys.stdin.read())
with open(os.path.join(ctx["drop_dir"], "control_marker"), "w") as f:
    f.write("written from inside")
print("PWNED")
