"""cluster/: the launcher YAML, the RayJob and the shared runtime env stay valid and in sync."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray._private.runtime_env.packaging import _dir_travel, _get_excludes  # how Ray applies `excludes`
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

from pivotal_ray import config as cfg

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
CONFIGS = REPO / "configs"
ENTRY_MODULE = "jobs.select"


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.fixture(scope="module")
def launcher() -> dict:
    return _load("cluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _load("rayjob.yaml")


@pytest.fixture(scope="module")
def runtime_env() -> dict:
    return _load("runtime_env.yaml")


def _overrides(command: str) -> list[str]:
    """The Hydra overrides after ``python -m jobs.select`` in a command line."""
    tokens = shlex.split(command)
    i = tokens.index(ENTRY_MODULE)
    assert tokens[i - 2: i] == ["python", "-m"], f"entry point must be `python -m {ENTRY_MODULE}`: {command!r}"
    return tokens[i + 1:]


def _check_override(item: str) -> tuple[str, str]:
    """Each override must be ``key=value`` that the Hydra app understands.

    A bare key is a config-group choice (a folder under configs/, e.g. ``ray=gpu_cluster``) or a
    top-level key of configs/config.yaml (``method``); a dotted or field key must be a field of
    :class:`ExperimentConfig` or one of its stage sections.
    """
    key, sep, value = item.partition("=")
    assert sep and value and not key.startswith("-"), f"not a Hydra override: {item!r}"
    if "." not in key and (CONFIGS / key).is_dir():
        choices = {p.stem for p in (CONFIGS / key).glob("*.yaml")}
        # experiment/ is filled by another part of the project; its own test checks the choice.
        assert key == "experiment" or value in choices, f"override {item!r}: choose one of {sorted(choices)}"
        return key, value
    if "." not in key and key in (yaml.safe_load((CONFIGS / "config.yaml").read_text()) or {}):
        return key, value
    parts = key.split(".")
    node: type = cfg.ExperimentConfig
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node)}
        assert part in fields, f"override {item!r}: no field {part!r} in {node.__name__}"
        if i < len(parts) - 1:
            # Stage sections are built by their default_factory, which is the section's class.
            sub = fields[part].default_factory
            assert dataclasses.is_dataclass(sub), f"override {item!r}: {part!r} has no sub-keys"
            node = sub
    return key, value


# ---------------------------------------------------------------- every file parses


@pytest.mark.parametrize("name", ["cluster.yaml", "rayjob.yaml", "runtime_env.yaml"])
def test_every_yaml_parses_to_a_mapping(name: str) -> None:
    assert isinstance(_load(name), dict)


# ---------------------------------------------------------------- cluster launcher


def test_launcher_validates_against_rays_schema(launcher: dict) -> None:
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(launcher, json.loads(schema_path.read_text()))
    # Ray's full check as `ray up` runs it: schema plus head_node_type / cluster_synced_files
    # rules, before and after merging the AWS defaults.
    validate_config(launcher)
    validate_config(prepare_config(launcher))


def test_schema_check_is_not_vacuous(launcher: dict) -> None:
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    broken = json.loads(json.dumps(launcher))
    broken["available_node_types"]["worker.gpu"]["resources"]["GPU"] = 0.5  # must be an integer
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_launcher_node_types_are_sane(launcher: dict) -> None:
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("CPU", 0) <= 1, "head should host drivers only (CPU: 0)"
    assert head["resources"].get("GPU", 0) == 0
    assert head["min_workers"] == head["max_workers"] == 0
    workers = {k: v for k, v in types.items() if k != launcher["head_node_type"]}
    gpu = [v for v in workers.values() if v["resources"].get("GPU", 0) >= 1]
    assert gpu, "need an autoscaling GPU worker type"
    for node in gpu:
        assert node["min_workers"] == 0 < node["max_workers"] <= launcher["max_workers"]
        assert node["resources"]["CPU"] >= 1
        assert re.match(r"^(g|p)\d", node["node_config"]["InstanceType"]), "GPU type must be a g*/p* instance"
    assert launcher["idle_timeout_minutes"] > 0


def test_launcher_installs_the_project(launcher: dict) -> None:
    mounted = [remote for remote, local in launcher["file_mounts"].items() if local == "."]
    assert mounted, "the checkout must be file-mounted"
    setup = " ".join(launcher["setup_commands"])
    assert re.search(r"pip install (-e )?\"?\$HOME/pivotal_ray", setup)
    assert mounted[0].replace("~", "$HOME") in setup


# ---------------------------------------------------------------- runtime env


def test_runtime_env_is_accepted_by_ray(runtime_env: dict) -> None:
    env = RuntimeEnv(**runtime_env)  # raises on unknown fields or non-string env vars
    assert env["working_dir"] == "."
    assert env["env_vars"]["PYTHONUNBUFFERED"] == "1"


SHIPPED = [
    "jobs/select.py",
    "pivotal_ray/core/metrics.py",
    "pivotal_ray/data/loader.py",  # only the top-level data/ is excluded
    "configs/experiment/mnist_adv60.yaml",
    ".git/HEAD",  # so manifest.json can name the commit that ran
    ".git/refs/heads/main",
    ".git/packed-refs",
]
LEFT_BEHIND = [
    "outputs/run/manifest.json",
    ".venv/bin/python",
    ".git/objects/ab/cdef",
    ".git/index",
    "pivotal_ray/core/__pycache__/metrics.cpython-311.pyc",
    "pivotal_ray.egg-info/PKG-INFO",
    "data/MNIST/raw/train-images-idx3-ubyte",
]


def test_runtime_env_excludes_ship_code_not_outputs(runtime_env: dict, tmp_path: Path) -> None:
    # Walk a fake checkout with Ray's own packaging traversal (directories pruned when matched).
    for rel in SHIPPED + LEFT_BEHIND:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    seen: list[str] = []
    _dir_travel(tmp_path, [_get_excludes(tmp_path, runtime_env["excludes"])],
                lambda p: seen.append(p.relative_to(tmp_path).as_posix()), include_gitignore=False)
    assert set(SHIPPED) <= set(seen)
    assert not set(LEFT_BEHIND) & set(seen)


# ---------------------------------------------------------------- RayJob


def test_rayjob_runtime_env_equals_runtime_env_yaml(rayjob: dict, runtime_env: dict) -> None:
    assert yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"]) == runtime_env


def test_rayjob_shape(rayjob: dict) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    # HTTPMode cannot upload the local working_dir "."; the submitter pod must do it.
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    rc = spec["rayClusterSpec"]
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["rayVersion"].startswith(ray.__version__.rsplit(".", 1)[0])
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = rc["workerGroupSpecs"]
    gpu = [g for g in groups
           if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu, "need a GPU worker group"
    for g in gpu:
        assert 0 == g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] >= 1
    for params in [rc["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in groups]:
        assert all(isinstance(v, str) for v in params.values()), "KubeRay rayStartParams values must be strings"


def test_the_shared_folders_the_rayjob_writes_are_made_for_the_images_user(rayjob: dict) -> None:
    # the entry point's output_dir, data.root and ray.storage_path lie in folders the head's init
    # container makes and gives to uid 1000 (a new NFS/EFS volume is root-owned)
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (init,) = head["initContainers"]
    script = init["command"][-1]
    items = dict(_check_override(o) for o in _overrides(rayjob["spec"]["entrypoint"]))
    for key in ("output_dir", "data.root", "ray.storage_path"):
        top = "/".join(items[key].split("/")[:4])  # /mnt/shared/<folder>
        assert "mkdir -p" in script and top in script.split("&&")[0] and top in script.split("&&")[1], (key, script)
    assert "chown 1000:100" in script and init["securityContext"]["runAsUser"] == 0


def test_rayjob_uses_one_image_everywhere(rayjob: dict) -> None:
    # Submitter, head and workers on different images is the classic Ray version mismatch.
    spec = rayjob["spec"]
    rc = spec["rayClusterSpec"]
    pods = [spec["submitterPodTemplate"], rc["headGroupSpec"]["template"]]
    pods += [g["template"] for g in rc["workerGroupSpecs"]]
    images = {c["image"] for p in pods for c in p["spec"]["containers"] + p["spec"].get("initContainers", [])}
    assert len(images) == 1, images
    # No command: KubeRay then injects its own `ray job submit` into the submitter.
    assert "command" not in spec["submitterPodTemplate"]["spec"]["containers"][0]


# ---------------------------------------------------------------- entry points


def _readme_submit_commands() -> list[str]:
    text = (CLUSTER / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    joined = "\n".join(b.replace("\\\n", " ") for b in blocks)
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("ray job submit")]


def test_both_entry_points_run_jobs_select(rayjob: dict) -> None:
    commands = [rayjob["spec"]["entrypoint"]] + _readme_submit_commands()
    assert len(commands) >= 2, "README must show a `ray job submit` command"
    for command in commands:
        assert f"python -m {ENTRY_MODULE}" in command
        if command.startswith("ray job submit"):
            assert "--runtime-env cluster/runtime_env.yaml" in command


@pytest.mark.parametrize("source", ["rayjob", "readme"])
def test_entry_point_overrides_name_real_keys_and_absolute_outputs(rayjob: dict, source: str) -> None:
    commands = [rayjob["spec"]["entrypoint"]] if source == "rayjob" else _readme_submit_commands()
    for command in commands:
        items = dict(_check_override(o) for o in _overrides(command))
        assert "output_dir" in items, f"pass output_dir explicitly: {command!r}"
        out = items["output_dir"]
        assert out.startswith("/") and "://" not in out, f"output_dir must be an absolute path: {out!r}"


def test_override_checker_rejects_typos() -> None:
    with pytest.raises(AssertionError, match="no field"):
        _check_override("ray.use_gpus=true")
    with pytest.raises(AssertionError, match="choose one of"):
        _check_override("ray=gpu_clusters")
    with pytest.raises(AssertionError, match="not a Hydra override"):
        _check_override("--verbose")
    assert _check_override("ray=gpu_cluster") == ("ray", "gpu_cluster")
    assert _check_override("method=random") == ("method", "random")


def test_entry_module_and_experiment_exist(rayjob: dict) -> None:
    assert (REPO / "jobs" / "select.py").is_file()
    written = list((CONFIGS / "experiment").glob("*.yaml"))
    if not written:
        pytest.skip("configs/experiment/ is not written yet")
    for command in [rayjob["spec"]["entrypoint"]] + _readme_submit_commands():
        experiment = dict(_check_override(o) for o in _overrides(command))["experiment"]
        path = CONFIGS / "experiment" / f"{experiment}.yaml"
        assert path.is_file(), f"entry point names experiment={experiment} but {path} is missing"


def _cpus(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity ("7", "500m") in cores."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_gpu_nodes_hold_all_of_a_runs_gpu_cluster_train_workers(launcher: dict, rayjob: dict) -> None:
    # A Train worker asks for cpus_per_worker CPUs + 1 GPU; a GPU node smaller than that would
    # leave the run pending forever while the autoscaler adds nodes that can never host it. And one
    # node holds all num_workers of a run (Ray Train packs them), so the meta re-weighting step's
    # all-reduces of every parameter stay off the network (cluster/cluster.yaml).
    preset = yaml.safe_load((CONFIGS / "ray" / "gpu_cluster.yaml").read_text())
    workers, cpus = int(preset["num_workers"]), float(preset["cpus_per_worker"])
    assert preset["use_gpu"] is True and workers > 1
    gpu_types = [(name, node["resources"]) for name, node in launcher["available_node_types"].items()
                 if node["resources"].get("GPU", 0) >= 1]
    assert gpu_types
    for name, res in gpu_types:
        assert res["GPU"] >= workers and res["CPU"] >= workers * cpus, f"{name}: {res} < {workers} x ({cpus} CPU + 1 GPU)"
    for group in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert _cpus(limits["cpu"]) >= workers * cpus, f"worker group {group['groupName']}: cpu {limits['cpu']}"
        assert int(limits["nvidia.com/gpu"]) >= workers, f"worker group {group['groupName']}: {limits}"
    assert _cpus("500m") == 0.5


def test_autoscaling_clusters_skip_the_preflight_resource_checks(launcher: dict, rayjob: dict) -> None:
    # Both clusters start with a CPU-less head and no workers, so the checks of CPUs/GPUs against
    # what the cluster has now would refuse every job: their entry points must say autoscaling.
    assert launcher["available_node_types"][launcher["head_node_type"]]["resources"].get("CPU", 0) == 0
    assert yaml.safe_load((CONFIGS / "ray" / "gpu_cluster.yaml").read_text())["autoscaling"] is True
    for command in [rayjob["spec"]["entrypoint"]] + [c for c in _readme_submit_commands() if "ray=gpu_cluster" in c]:
        items = dict(_check_override(o) for o in _overrides(command))
        assert items.get("ray") == "gpu_cluster" or items.get("ray.autoscaling") == "true", command


def test_launcher_nodes_share_storage_and_s3_credentials(launcher: dict) -> None:
    # Feature tables are written by Ray Data tasks on the workers and read by the driver on the
    # head; snapshots are written by workers and read by other workers: one mount on every node.
    assert any("/mnt/shared" in c and "mount" in c for c in launcher["initialization_commands"])  # the host
    assert "-v /mnt/shared:/mnt/shared" in launcher["docker"]["run_options"]  # seen in the container
    for name, node in launcher["available_node_types"].items():
        # a worker profile makes every worker launch fail unless the head's role may pass it
        # (iam:PassRole, which the role Ray creates for the head lacks): EFS needs none
        assert "IamInstanceProfile" not in node["node_config"] or name == launcher["head_node_type"], name
    for command in _readme_submit_commands():
        if "ray=gpu_cluster" in command:
            out = dict(_check_override(o) for o in _overrides(command))["output_dir"]
            assert out.startswith("/mnt/shared/"), command


def test_launcher_runs_the_rayjob_python_and_ray(launcher: dict) -> None:
    # the container brings Python 3.11 and Ray 2.60 (as the RayJob's base image and pyproject.toml)
    image = launcher["docker"]["image"]
    assert image.startswith("rayproject/ray:2.60.") and "-py311" in image and image.endswith("-gpu")


def test_runtime_env_sets_the_ray_env_vars_of_local_runs(runtime_env: dict) -> None:
    # a job submitted to a cluster gets the same Ray Train settings as a local run
    from pivotal_ray.pipeline import RAY_ENV_VARS

    assert {k: runtime_env["env_vars"].get(k) for k in RAY_ENV_VARS} == RAY_ENV_VARS


def test_launcher_names_an_ami_with_a_new_enough_driver(launcher: dict) -> None:
    # Ray's default AMI (CUDA 11.2 driver) cannot run PyPI's CUDA 13 torch: every node names the
    # AMI the README looks up, and the README's lookup fills the placeholder the YAML holds
    ids = {node["node_config"].get("ImageId") for node in launcher["available_node_types"].values()}
    assert ids == {"AMI_ID"}
    readme = (REPO / "cluster" / "README.md").read_text()
    assert "base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id" in readme and 's/AMI_ID/$AMI/' in readme
