# Attack: write outside the private directory: a marker in the host /tmp, a file in the repository, a file in
# the filesystem root. Contained: /tmp is the private directory (mount namespace), the rest is not writable by
# the sandbox uid. Prints PWNED only if a write to the repository or / worked (the /tmp one is checked by the test).
import json
import sys

ctx = json.loads(sys.stdin.read())
with open(ctx["tmp_marker"], "w") as f:  # lands in the private /tmp when there is a mount namespace
    f.write("x")
wins = 0
for path in (ctx["repo"] + "/oapl_attack_" + ctx["token"], "/oapl_attack_" + ctx["token"]):
    try:
        with open(path, "w") as f:
            f.write("x")
        wins += 1
    except OSError:
        pass
print("PWNED" if wins else "blocked")
