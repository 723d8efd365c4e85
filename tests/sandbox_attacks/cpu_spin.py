# Attack: infinite CPU loop; contained by RLIMIT_CPU (SIGXCPU) and the wall-clock limit.
while True:
    pass
