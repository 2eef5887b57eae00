import signal, subprocess, sys, time
cmd = [".venv/bin/python", "-m", "jobs.compare", "experiment=toy_fig1", "compare.methods=[random,rbc]", "compare.seeds=[0,1]",
       "compare.concurrency=2", "compare.plots=false", "compare.output_root=/tmp/cc3/out"]
with open("/tmp/cc3/log.txt", "w") as f:
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(float(sys.argv[1]))
    t = time.time(); p.send_signal(signal.SIGINT)
    rc = p.wait(); print("exit", rc, "after", round(time.time() - t, 1), "s")
