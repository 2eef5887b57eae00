"""``ray job submit`` of ``python -m jobs.select`` to a separate local two-node Ray cluster that this
test owns: a head (1 CPU, the job server) and a worker node (1 CPU) joined to it, so the job's two
Ray Train workers run on different nodes (gloo between nodes) and its actors on either.

Each node runs in its own process group with its own temp dir (so no other ``ray.init()`` on this
machine can find it through /tmp/ray/ray_current_cluster), its own ports and its own auth token
(``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN_PATH`` to a private file: the shared ~/.ray/auth_token is
neither read nor written). Teardown terminates exactly that process group; ``ray stop`` is never
used because it would stop every Ray cluster on the machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from .procs import processes

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
# tiny toy run: 2 random warm-up + 4 picked by RBC, a few epochs; two training workers of 1 CPU,
# one per node
OVERRIDES = ["method=rbc", "seed=0", "reweight.epochs=3", "features.num_snapshots=2", "features.stride=1",
             "selection.budget=6", "selection.warmup=2", "ray.num_workers=2", "ray.cpus_per_worker=1"]


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _get(url: str, token: str, timeout: float = 5.0) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return 0


def _state(address: str, token: str, what: str, *, tries: int = 1) -> list[dict]:
    """Rows of Ray's state API (``/api/v0/<what>``: nodes, actors) from the head's dashboard, asked
    up to ``tries`` times (a loaded machine answers slowly); [] when it never answers, or raises
    AssertionError with the last error when ``tries`` > 1."""
    req = urllib.request.Request(f"{address}/api/v0/{what}?limit=10000&detail=1",
                                 headers={"Authorization": f"Bearer {token}"})
    err: Exception | None = None
    for attempt in range(tries):
        if attempt:
            time.sleep(2.0)
        try:
            with urllib.request.urlopen(req, timeout=30.0) as resp:
                return json.loads(resp.read())["data"]["result"]["result"]
        except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
            err = e
    if tries > 1:
        raise AssertionError(f"Ray's state API at {address}/api/v0/{what} did not answer in {tries} tries: {err!r}")
    return []


def _alive_nodes(address: str, token: str) -> set[str]:
    return {n["node_id"] for n in _state(address, token, "nodes") if n.get("state") == "ALIVE"}


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line mentions ``text`` (our private temp dir): stragglers of our head."""
    return [pid for pid, (_, cmdline) in processes().items() if pid != os.getpid() and text in cmdline]


@pytest.fixture(scope="module")
def ray_head():
    """A 1-CPU Ray head with the dashboard (job server) and a 1-CPU worker node joined to it, each on
    free ports, torn down by process group."""
    # short path: Ray puts unix sockets under <temp dir>/session_*/sockets (108-byte limit)
    root = Path(tempfile.mkdtemp(prefix="prjs-", dir="/tmp"))
    token_file = root / "auth_token"
    token = secrets.token_hex(32)
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS etc. leaking in
    env.update(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM: stop at once, no 30 s drain
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0",
               RAY_worker_niceness="0",  # as the other tests' Ray (tests/conftest.py: ray_session)
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")  # the job's `python` is this venv's
    env.pop("PYTHONPATH", None)  # the job must import the package from its uploaded working dir
    log = open(root / "head.log", "wb")
    worker_log = open(root / "worker.log", "wb")
    proc = worker = None
    try:
        # _free_ports closes its sockets before Ray binds the ports, so another process may take one
        # meanwhile: a head that exits before its job server answers is started again on new ports
        for attempt in range(1, 4):
            proc, address, gcs = _start_head(root, env, log)
            deadline = time.monotonic() + 120
            while _get(f"{address}/api/jobs/", token) != 200:
                if time.monotonic() > deadline:
                    pytest.fail(f"job server at {address} did not answer in 120 s:\n"
                                f"{(root / 'head.log').read_text()[-3000:]}")
                if proc.poll() is not None:
                    break
                time.sleep(1.0)
            else:
                break
            _terminate(proc, root)  # what the exited head left behind
            if attempt == 3:
                pytest.fail(f"ray start exited with {proc.returncode} (3 starts, on new ports each time):\n"
                            f"{(root / 'head.log').read_text()[-3000:]}")
        # without the token the job server refuses: this cluster really uses token auth
        assert _get(f"{address}/api/jobs/", "wrong-token") in (401, 403)
        # the second node, started again on new ports if it exits before it has joined; where this
        # machine allows, it sees <root>/node_local empty (test_output_dir_not_shared_is_refused)
        hidden = root / "node_local"
        hidden.mkdir()
        if not _can_hide(root):
            hidden = None
        for attempt in range(1, 4):
            known = _alive_nodes(address, token)  # the head, and a failed start's node not yet marked dead
            worker = _start_worker(root, env, worker_log, gcs, hidden)
            deadline = time.monotonic() + 90
            while not _alive_nodes(address, token) - known and worker.poll() is None and time.monotonic() < deadline:
                time.sleep(1.0)
            if _alive_nodes(address, token) - known and worker.poll() is None:
                time.sleep(2.0)  # a node whose agent lost a port race dies just after it joins
                if worker.poll() is None:
                    break
            _terminate(worker, root, others=False)
            worker = None
            if attempt == 3:
                pytest.fail(f"the worker node did not join in 3 starts:\n{(root / 'worker.log').read_text()[-3000:]}")
        yield {"address": address, "env": env, "root": root, "token": token, "hidden": hidden}
    finally:
        if worker is not None:
            _terminate(worker, root, others=False)
        if proc is not None:
            _terminate(proc, root)
        log.close()
        worker_log.close()
        shutil.rmtree(root, ignore_errors=True)


def _start_head(root: Path, env: dict[str, str], log) -> tuple[subprocess.Popen, str, str]:
    """``ray start --head --block`` on free ports in its own process group; (process, job server URL,
    GCS address)."""
    gcs, dash, client, agent, agent_grpc, metrics, rt_env, node_mgr, obj_mgr = _free_ports(9)
    cmd = [RAY, "start", "--head", "--block", "--num-cpus", "1", "--object-store-memory", "300000000",
           "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--include-dashboard", "true",
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(rt_env),
           "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
           "--temp-dir", str(root / "ray"), "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}"


# ``sh -c`` script run by ``unshare --mount``: an empty tmpfs over the folder $0, then the command
HIDE = 'mount -t tmpfs -o size=8m pivotal-ray-test "$0" && exec "$@"'


def _can_hide(root: Path) -> bool:
    """Whether this machine lets us start a process that sees an empty folder where the others see
    ``root``'s files: a private mount namespace with a tmpfs mounted in it, which takes root (or
    CAP_SYS_ADMIN); elsewhere the test that needs it is skipped."""
    probe = root / "hide-probe"
    probe.mkdir()
    (probe / "f").write_text("x")
    try:
        run = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", HIDE, str(probe),
                              "sh", "-c", '! test -e "$0/f"', str(probe)], capture_output=True, timeout=30)
        return run.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def _start_worker(root: Path, env: dict[str, str], log, gcs: str, hidden: Path | None = None) -> subprocess.Popen:
    """``ray start --block --address <gcs>``: a 1-CPU worker node on free ports in its own process
    group, with a temp dir of its own under our private root (``<root>/worker``), as a node on
    another machine has: with the head's, both nodes unpack the job's working dir into the same
    directory, and the worker node's runtime-env agent deleted it under the running driver.
    ``hidden``: a folder that this node sees empty (its own tmpfs there, in a private mount
    namespace), as a node sees another machine's local disk."""
    agent, agent_grpc, metrics, rt_env, node_mgr, obj_mgr = _free_ports(6)
    cmd = [RAY, "start", "--block", "--address", gcs, "--num-cpus", "1", "--object-store-memory", "300000000",
           "--node-ip-address", "127.0.0.1", "--dashboard-agent-listen-port", str(agent),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
           "--runtime-env-agent-port", str(rt_env), "--node-manager-port", str(node_mgr),
           "--object-manager-port", str(obj_mgr), "--temp-dir", str(root / "worker"), "--disable-usage-stats"]
    if hidden is not None:
        cmd = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", HIDE, str(hidden), *cmd]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _terminate(proc: subprocess.Popen, root: Path, *, others: bool = True) -> None:
    """SIGTERM our ``ray start --block`` (it stops the processes it started), then SIGKILL its group;
    ``others``: then every process still naming our private temp dir (the last node's teardown)."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of ours still in the group
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)
    if not others:
        return
    # Ray processes that left the group (workers, agents) still name our private temp dir
    deadline = time.monotonic() + 10
    while _pids_mentioning(str(root)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _pids_mentioning(str(root)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def submitted(ray_head, tmp_path_factory):
    """``ray job submit`` of a tiny toy run, waiting for it to finish (logs stream back)."""
    out = tmp_path_factory.mktemp("job") / "out"  # absolute: the job runs from a temporary copy
    sub_id = f"pivotal-e2e-{secrets.token_hex(4)}"
    cmd = [RAY, "job", "submit", "--address", ray_head["address"], "--submission-id", sub_id,
           "--working-dir", str(REPO), "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"),
           "--", "python", "-m", "jobs.select", *OVERRIDES, f"output_dir={out}"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=420)
    return {"proc": proc, "logs": proc.stdout + proc.stderr, "out": out, "id": sub_id,
            "wall": time.monotonic() - t0, "root": ray_head["root"]}


def test_ray_job_submit_runs_the_select_job(submitted):
    proc, logs, out = submitted["proc"], submitted["logs"], submitted["out"]
    assert proc.returncode == 0, (f"ray job submit failed ({proc.returncode}) after {submitted['wall']:.0f}s:\n"
                                  f"{logs[-6000:]}")
    assert f"Job '{submitted['id']}' succeeded" in logs, logs[-3000:]
    assert "test accuracy at best validation epoch" in logs  # the driver's summary, streamed back

    # artefacts landed in the absolute output_dir
    assert {"selection.csv", "metrics.json", "manifest.json"} <= {p.name for p in out.iterdir()}
    sel = pd.read_csv(out / "selection.csv")
    assert len(sel) == 6 and sel["sample_id"].is_unique
    assert (sel["round"] == 0).sum() == 2 and (sel.loc[sel["round"] == 1, "cluster"] >= 0).all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "rbc" and 0.0 <= metrics["test_acc_at_best_val"] <= 1.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["status"] == "complete"
    # Ray Train storage defaulted under output_dir (not inside the temporary working-dir copy)
    assert any(p.name.startswith("warmup-") for p in (out / "ray_train").iterdir())


def test_the_job_ran_on_both_nodes(submitted, ray_head):
    """Each training run (warm-up, round 1) had its two workers on different nodes (1 CPU each:
    nowhere else to go), as Ray's state API recorded them, dead actors included; a run's workers
    are those of one placement group (a worker group Ray Train started again would be another).
    (The K-means shards' SPREAD placement group is best effort: they may share a node while the
    other's CPU is still being released, so where they ran is not asserted.)"""
    assert submitted["proc"].returncode == 0
    address, token = ray_head["address"], ray_head["token"]
    nodes = {n["node_id"] for n in _state(address, token, "nodes", tries=5) if n.get("state") == "ALIVE"}
    assert len(nodes) == 2
    actors = _state(address, token, "actors", tries=5)
    groups: dict[str, list[str]] = {}
    for a in actors:
        if a.get("class_name") == "RayTrainWorker":
            groups.setdefault(a.get("placement_group_id"), []).append(a["node_id"])
    assert len(groups) >= 2, groups  # the warm-up's worker group and round 1's
    for placed in groups.values():
        assert len(placed) == 2 and set(placed) == nodes, groups
    assert sum(a.get("class_name") == "ShardActor" for a in actors) == 2


def test_output_dir_not_shared_is_refused(ray_head, submitted):
    """output_dir on a folder the worker node does not see (its own empty tmpfs there, as another
    machine's local disk): the job stops before any work with an error naming output_dir and the
    fix, and leaves nothing behind, neither the run's folder nor the check's file."""
    hidden = ray_head["hidden"]
    if hidden is None:
        pytest.skip("this machine gives no private mount namespace (unshare --mount): no node can be "
                    "made to see a folder differently")
    assert submitted["proc"].returncode == 0  # the shared case, in the same cluster, passed the check
    out = hidden / "out"
    cmd = [RAY, "job", "submit", "--address", ray_head["address"], "--working-dir", str(REPO),
           "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"),
           "--", "python", "-m", "jobs.select", *OVERRIDES, f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=300)
    logs = proc.stdout + proc.stderr
    assert proc.returncode != 0, logs[-3000:]
    assert f"output_dir={out} is not on storage that every node of the Ray cluster shares" in logs, logs[-3000:]
    assert f"a file this driver wrote in {hidden} (where output_dir will be created)" in logs
    # the worker node, which sees its own empty folder there; the toy rbc run extracts features and
    # keeps its checkpoints under output_dir, so both are said
    assert re.search(r"is not there on 1 of the 1 other nodes: [0-9.:]+ \(no such file\)\. Ray Data's feature-"
                     r"extraction tasks write the feature tables under it and Ray Train's workers write their "
                     r"checkpoints under it \(ray.storage_path is unset: <output_dir>/ray_train\), on any node", logs), \
        logs[-3000:]
    assert "NFS/EFS" in logs
    assert "rbc: warmup training" not in logs and "rbc: warmup training" in submitted["logs"]  # before any work
    assert list(hidden.iterdir()) == []  # no run folder, no probe file left


def test_ray_job_stop_stops_the_job_as_ctrl_c_does(ray_head, submitted, tmp_path):
    """``ray job stop`` sends the driver SIGTERM (as timeout, Kubernetes and Slurm do). Ray's core
    worker installs a SIGTERM handler of its own at ray.init that dumps a stack and aborts; the job
    keeps its own over it and stops as after Ctrl-C: Ray left (the run's actors end with the
    driver), a line saying how to go on, exit status 143."""
    assert submitted["proc"].returncode == 0
    base = [RAY, "job"]
    addr = ["--address", ray_head["address"]]
    sub_id = f"pivotal-stop-{secrets.token_hex(4)}"
    cmd = [*base, "submit", *addr, "--no-wait", "--submission-id", sub_id, "--working-dir", str(REPO),
           "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"),
           "--", "python", "-m", "jobs.select", *OVERRIDES, f"output_dir={tmp_path / 'out'}"]
    run = dict(cwd=REPO, env=ray_head["env"], capture_output=True, text=True)
    subprocess.run(cmd, timeout=120, check=True, **run)

    def logs() -> str:
        return subprocess.run([*base, "logs", *addr, sub_id], timeout=60, **run).stdout

    deadline = time.monotonic() + 240
    while "rbc: warmup training" not in logs():  # Ray Train runs: the driver has joined Ray
        assert time.monotonic() < deadline, logs()[-3000:]
        time.sleep(1.0)
    stop = subprocess.run([*base, "stop", *addr, sub_id], timeout=120, **run)  # waits for the job to end
    assert stop.returncode == 0, stop.stdout + stop.stderr
    text = logs()
    assert "terminated (SIGTERM): run the same command again to go on" in text, text[-3000:]
    assert "SIGTERM received at time" not in text  # Ray's handler: a stack dump, then abort
    deadline = time.monotonic() + 30
    while [a for a in _state(ray_head["address"], ray_head["token"], "actors", tries=5)
           if a.get("class_name") == "RayTrainWorker" and a.get("state") == "ALIVE"]:
        assert time.monotonic() < deadline, "the stopped job's training workers are still alive"
        time.sleep(1.0)


def _unpacked_working_dirs(root: Path, node: str = "*") -> list[Path]:
    """The job's working dir as unpacked by the head (``node="ray"``), the worker node ("worker") or both."""
    found = root.glob(f"{node}/session_*/runtime_resources/working_dir_files/_ray_pkg_*")
    return sorted({p.resolve() for p in found if p.is_dir()})  # session_latest is a link; skip *.zip.lock


def test_uploaded_working_dir_leaves_out_the_excludes(submitted):
    assert submitted["proc"].returncode == 0
    for node in ("ray", "worker"):  # the head's temp dir, the worker node's
        assert _unpacked_working_dirs(submitted["root"], node), f"no unpacked working dir in {node}/session_*"
    pkgs = _unpacked_working_dirs(submitted["root"])
    for pkg in pkgs:
        names = {p.name for p in pkg.iterdir()}
        assert {"pivotal_ray", "jobs", "configs", "cluster"} <= names
        assert not names & {".venv", "outputs", ".hypothesis", ".pytest_cache", "pivotal_ray.egg-info"}
        assert not list(pkg.rglob("__pycache__"))
        assert not (pkg / ".git" / "objects").exists() and not (pkg / ".git" / "index").exists()


def test_job_manifest_names_the_commit_that_ran(submitted):
    from pivotal_ray.core.artifacts import git_revision

    assert submitted["proc"].returncode == 0
    if (REPO / ".git").is_dir():  # in a git worktree .git is a file naming another checkout: no HEAD to ship
        for pkg in _unpacked_working_dirs(submitted["root"]):
            assert (pkg / ".git" / "HEAD").is_file()
    manifest = json.loads((submitted["out"] / "manifest.json").read_text())
    assert manifest["git_revision"] is not None and manifest["git_revision"] == git_revision(REPO)
    # the job ran from Ray's copy of the working dir, whose .git holds HEAD and refs only: what
    # differed from the commit cannot be told there, and is not taken from another repository.
    # (From a git worktree the copy's .git is the worktree's link to its git dir on this machine,
    # so git compares the copy with that index: a list of the copy's changed tracked files.)
    if (REPO / ".git").is_dir():
        assert manifest["git_changes"] is None
    else:
        assert isinstance(manifest["git_changes"], list)
