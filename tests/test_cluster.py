"""Ray clusters on this machine, made by cluster/*.sh as the README shows: a loopback-only head that
takes a job the moment start-local.sh returns (with cluster/runtime_env.yaml: the working dir, pip,
the Keras switch, the data folder); and a head with a second node, where a 2-worker jobs/train.py run
whose workers Ray placed on both nodes loses the second node mid-run and recovers on a replacement.

The nodes of these clusters lack the project: a `digits_ray` that refuses to import comes first on
their PYTHONPATH, so every process of a job must import the copy that `--working-dir` shipped.
Each test stops exactly what it started (stop-local.sh, then whatever is left of its sessions).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.processes import marked_env, marked_pids, session_pids, stop_marked

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # a Ray Train run's persisted checkpoint state
PROBE = """
import json, os, sys
import ray
from digits_ray.data.split import load_train_val

def facts():
    import digits_probe
    import digits_ray
    return {"digits_ray": digits_ray.__file__, "digits_probe": digits_probe.__file__, "python": sys.executable,
            "keras_switch": os.environ.get("TF_USE_LEGACY_KERAS"), "data_dir": os.environ.get("DIGITS_DATA_DIR")}

ray.init()
data = load_train_val(0.1, 0, None)  # from DIGITS_DATA_DIR
print("PROBE " + json.dumps({"driver": facts(), "task": ray.get(ray.remote(facts).remote()),
                             "train_images": len(data.y_train)}))
"""


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, every_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every_s)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")


def env_pids(entry: str) -> set[int]:
    """Processes whose environment holds ``entry`` (NAME=value) as read from /proc."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if entry.encode() in (proc / "environ").read_bytes().split(b"\0"):
                    pids.add(int(proc.name))
            except OSError:
                continue
    return pids


def listening_sockets(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket these processes listen on, from /proc."""
    owner = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    owner[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in owner:  # 0A: LISTEN
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # words are little-endian
                found.append((socket.inet_ntop(family, raw), int(port, 16), owner[fields[9]]))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def probe_wheel(folder: Path) -> Path:
    """A one-module wheel installed nowhere: only `pip` in the runtime_env can make it importable
    (from this file, so offline too)."""
    name, version = "digits_probe", "0.1"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"WHERE = 'the runtime_env pip'\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: digits-probe\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for path, data in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


class LocalCluster:
    """The scripts of cluster/, run as a user would, with this test's marker and state folder."""

    def __init__(self, env: dict[str, str], marker: str):
        self.env, self.marker = env, marker
        self.dir = Path(env["DIGITS_CLUSTER_DIR"])
        self.leaders: set[int] = set()  # every node's `ray start --block` (the leader of its session)

    def script(self, name: str, *args: str, timeout: float = 180, check: bool = True, **env: str):
        done = subprocess.run([str(CLUSTER / name), *args], env={**self.env, **env}, capture_output=True,
                              text=True, timeout=timeout)
        self.leaders |= {int(p.read_text()) for p in self.dir.glob("nodes/*.pid")}
        if check:
            assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
        return done

    def state(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in (self.dir / "cluster").read_text().splitlines())

    def ray(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run(["ray", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"ray {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def listed(self, kind: str, *filters: str) -> list[dict[str, Any]]:
        flags = [arg for f in filters for arg in ("--filter", f)]
        listed = self.ray("list", kind, "--address", self.state()["DASHBOARD_URL"], "--format", "json",
                          "--detail", "--limit", "1000", *flags)
        return [] if listed.startswith("No resource") else json.loads(listed)

    def node_names(self) -> dict[str, str]:
        return {n["node_id"]: n["node_name"] for n in self.listed("nodes")}

    def submit(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["ray", "job", "submit", "--address", self.state()["DASHBOARD_URL"], *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def processes(self) -> set[int]:
        return session_pids(self.leaders) | marked_pids(self.marker)


@contextmanager
def local_cluster(tmp_path: Path, **env: str) -> Iterator[LocalCluster]:
    """A state folder and environment for cluster/*.sh; afterwards stop-local.sh, then anything of
    this test's left (its nodes' sessions, its marker) gets SIGKILL and the folder goes."""
    shadow = tmp_path / "not-installed"
    (shadow / "digits_ray").mkdir(parents=True)
    (shadow / "digits_ray" / "__init__.py").write_text(
        "raise ImportError('digits_ray is not installed on this node: ship it with --working-dir')\n")
    base, marker = marked_env(RAY_AUTH_MODE="token", PYTHONPATH=str(shadow), NUM_CPUS="1", **env)
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "DIGITS_DATA_DIR"):  # they would point elsewhere
        base.pop(name, None)
    base["DIGITS_CLUSTER_DIR"] = base["RAY_TMPDIR"]  # short: Ray's socket paths live under it
    cluster = LocalCluster(base, marker)
    try:
        yield cluster
    finally:
        try:
            cluster.script("stop-local.sh", timeout=120, check=False)
        except subprocess.TimeoutExpired:
            pass
        for pid in cluster.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stop_marked(marker, base["RAY_TMPDIR"], grace_s=10)


def test_the_runtime_env_file_installs_what_pyproject_depends_on():
    """cluster/runtime_env.yaml's pip list is pyproject.toml's dependencies, less Ray (on every node)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert sorted(runtime_env["pip"]["packages"]) == sorted(d.replace(" ", "") for d in project
                                                            if not d.startswith("ray["))
    assert runtime_env["env_vars"]["TF_USE_LEGACY_KERAS"] == "1"


def test_the_cluster_scripts_parse():
    for script in sorted(CLUSTER.glob("*.sh")):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script


@pytest.mark.slow
def test_a_loopback_head_takes_a_job_at_once_and_stops_alone(tmp_path, small_mnist):
    """start-local.sh returns once jobs are accepted; the first job runs with cluster/runtime_env.yaml
    (plus the data folder and a wheel that only pip can bring); every port is on loopback; the head
    refuses worker nodes with the way out; stop-local.sh leaves nothing and touches nothing else."""
    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    runtime_env["pip"]["packages"].append(str(probe_wheel(tmp_path)))
    runtime_env["env_vars"]["DIGITS_DATA_DIR"] = str(small_mnist)
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    # Another Ray-looking process of this user, in a session of its own: stop-local.sh must leave it be.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(900)", "ray", "raylet"],
                                 start_new_session=True)
    try:
        with local_cluster(tmp_path) as cluster:
            cluster.script("start-local.sh")
            state = cluster.state()
            assert state["MODE"] == "loopback" and state["GCS_ADDRESS"].startswith("127.0.0.1:")

            job = cluster.submit("--runtime-env", str(tmp_path / "runtime_env.yaml"), "--working-dir", str(ROOT),
                                 "--", "python", "-c", PROBE, timeout=480)
            (tmp_path / "job.log").write_text(job.stdout + job.stderr)
            assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
            facts = json.loads(next(line for line in job.stdout.splitlines() if line.startswith("PROBE "))[6:])
            for where in ("driver", "task"):
                seen = facts[where]
                assert "/runtime_resources/working_dir_files/" in seen["digits_ray"], seen  # the shipped copy
                assert "/runtime_resources/pip/" in seen["digits_probe"], seen  # installed by the job's pip
                assert "/runtime_resources/pip/" in seen["python"], seen  # inside the job's virtualenv
                assert seen["keras_switch"] == "1" and seen["data_dir"] == str(small_mnist), seen
            assert facts["train_images"] == 4500  # 90% of the subset's 5,000, read from the data folder

            sockets = listening_sockets(cluster.processes())
            ports = {port for _, port, _ in sockets}
            assert int(state["GCS_ADDRESS"].rsplit(":", 1)[1]) in ports
            assert int(state["DASHBOARD_URL"].rsplit(":", 1)[1]) in ports
            assert [s for s in sockets if not is_loopback(s[0])] == [], "Ray listens beyond loopback"

            refused = cluster.script("add-worker.sh", check=False)
            assert refused.returncode == 1 and "start-local.sh --multi-node" in refused.stderr

            cluster.script("stop-local.sh", timeout=120)
            assert cluster.processes() == set(), "stop-local.sh left processes of its cluster"
            assert bystander.poll() is None, "stop-local.sh stopped a process that was not its own"
            assert not (cluster.dir / "cluster").exists() and not (cluster.dir / "env").exists()
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.slow
def test_a_two_node_run_recovers_when_its_second_node_dies(tmp_path, small_mnist):
    """Head and node-b (1 CPU each) as separate `ray start` processes; a 2-worker jobs/train.py whose
    workers Ray placed one per node; node-b SIGKILLed once the first checkpoint exists; a replacement
    node-c; the run resumes from its checkpoint under FailureConfig and finishes every epoch once."""
    runs, out, name = tmp_path / "runs", tmp_path / "model", "two-nodes"
    with local_cluster(tmp_path) as cluster:
        cluster.script("start-local.sh", "--multi-node")
        cluster.script("add-worker.sh", NODE_NAME="node-b")
        status = cluster.script("status.sh").stdout
        assert "node-b" in status and "head" in status and "2.0 CPU" in status
        node_b = int((cluster.dir / "nodes" / "node-b.pid").read_text())

        runtime_env = {"env_vars": {"TF_USE_LEGACY_KERAS": "1", "DIGITS_DATA_DIR": str(small_mnist)}}
        job_id = f"two-nodes-{os.getpid()}"
        # 0.75 CPU per worker: two never fit on one 1-CPU node; the augmentation actor takes the rest.
        command = ["ray", "job", "submit", "--address", cluster.state()["DASHBOARD_URL"], "--submission-id", job_id,
                   "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
                   "python", "jobs/train.py", "--model", "dense", "--epochs", "10", "--batch-size", "128",
                   "--workers", "2", "--cpus-per-worker", "0.75", "--data-actors", "1", "--cpus-per-data-actor",
                   "0.25", "--block-rows", "1024", "--max-failures", "2", "--storage-path", str(runs),
                   "--name", name, "--out", str(out)]
        with (tmp_path / "job.log").open("w") as log:
            job = subprocess.Popen(command, env=cluster.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            def alive_workers():
                assert job.poll() is None, (tmp_path / "job.log").read_text()[-4000:]
                workers = cluster.listed("actors", "class_name=RayTrainWorker", "state=ALIVE")
                return workers if len(workers) == 2 else None

            names = cluster.node_names()
            first = wait_for("2 training workers", alive_workers, timeout_s=240, every_s=2)
            assert sorted(names[w["node_id"]] for w in first) == ["head", "node-b"]  # Ray placed them so

            def checkpointed():  # Ray has registered the first checkpoint (or the run is over)
                try:
                    return job.poll() is not None or "epoch_0001" in (runs / name / SNAPSHOT).read_text()
                except OSError:
                    return False

            wait_for("the first checkpoint", checkpointed, timeout_s=120, every_s=0.2)
            assert job.poll() is None, "the run ended before node-b could be killed"
            node_id = cluster.state()["CLUSTER_ID"]
            victims = session_pids({node_b}) | env_pids(f"DIGITS_RAY_NODE={node_id}:node-b")
            for pid in victims:  # the whole node at once, as when its machine dies
                os.kill(pid, signal.SIGKILL)
            cluster.script("add-worker.sh", NODE_NAME="node-c")
            job.wait(timeout=300)
        except BaseException:
            subprocess.run(["ray", "job", "stop", "--address", cluster.state()["DASHBOARD_URL"], job_id],
                           env=cluster.env, capture_output=True, timeout=60)
            job.kill()
            job.wait()
            raise
        log = (tmp_path / "job.log").read_text()
        assert job.returncode == 0, log[-4000:]

        all_workers = cluster.listed("actors", "class_name=RayTrainWorker")
        names = cluster.node_names()
        assert {names[w["node_id"]] for w in all_workers} == {"head", "node-b", "node-c"}

    from digits_ray import artifact

    metadata = artifact.read_metadata(out)
    starts = metadata["trained_with"]["attempt_start_epochs"]
    assert starts[0] == 0 and len(starts) >= 2 and starts[-1] >= 1, starts  # resumed, not restarted
    assert list(artifact.read_history(out)["epoch"]) == list(range(1, 11))  # every epoch once
    assert metadata["trained_with"]["workers"] == 2 and 0.5 < metadata["test_accuracy"] <= 1
