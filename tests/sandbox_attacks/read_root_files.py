# Attack: read root-only files (/etc/shadow, root's home, pid 1's environment); contained by the unprivileged uid.
wins = []
for path in ("/etc/shadow", "/root/.bashrc", "/root/.profile", "/proc/1/environ"):
    try:
        with open(path, "rb") as f:
            f.read(1)
        wins.append(path)
    except OSError:
        pass
print("PWNED " + " ".join(wins) if wins else "blocked")
