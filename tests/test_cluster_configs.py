"""The cloud cluster configs, checked offline: cluster/{aws,gcp}.yaml (`ray up`) and cluster/kuberay/*.yaml.

Nothing here reaches a cloud or Kubernetes. Each config is validated against the schema its tool uses:
Ray's cluster-launcher schema (ray/autoscaler/ray-schema.json) plus the config preparation `ray up` does
before it contacts the cloud; KubeRay v1.7.0's CRD schemas (vendored in tests/data/kuberay), with unknown
fields made errors; Ray Serve's config schema and Ray's runtime_env checks for what the manifests embed.
Whatever a config names in this repository must exist: job scripts (and their argument parsers must
accept the flags), the Serve import path, mounted files. Each kind of check is also run on a deliberately
broken copy, which must fail: the checks are shown to bite.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import functools
import gzip
import importlib.metadata
import importlib.util
import io
import json
import re
import shlex
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_CONFIGS = ("aws", "gcp")
KUBERAY_DIR = ROOT / "cluster" / "kuberay"
KUBERAY_FILES = ("raycluster.yaml", "rayjob-train.yaml", "rayjob-tune.yaml", "rayservice.yaml")
CRD_DIR = Path(__file__).parent / "data" / "kuberay"
CRDS = {("ray.io/v1", "RayCluster"): "rayclusters", ("ray.io/v1", "RayJob"): "rayjobs",
        ("ray.io/v1", "RayService"): "rayservices"}
CLUSTER_NAME = "digits-ray"  # raycluster.yaml's RayCluster, which the RayJobs select
AUTH_SECRET = "digits-ray-auth"
SHARED = "/mnt/shared"  # the shared file system's mount point on every node and pod
RUNTIME_ENV_KEYS = {"working_dir", "pip", "env_vars"}
# The repository zip that KubeRay's runtime_envs name: one URL everywhere, so that one sed sets it.
REPO_ZIP = re.compile(r"https://github\.com/[\w.-]+/digits-ray/archive/[\w.-]+\.zip")
RAY_VERSION = importlib.metadata.version("ray")
CPU_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311"
GPU_IMAGE = f"{CPU_IMAGE}-gpu"
# Core Kubernetes kinds beside the ray.io resources: small strict schemas of the fields used here (not
# Kubernetes' own schemas, which this repository does not vendor).
PVC_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "v1"}, "kind": {"const": "PersistentVolumeClaim"},
        "metadata": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
        "spec": {"type": "object", "additionalProperties": False, "required": ["accessModes", "resources"],
                 "properties": {
                     "accessModes": {"type": "array", "contains": {"const": "ReadWriteMany"}},
                     "storageClassName": {"type": "string"},
                     "resources": {"type": "object", "additionalProperties": False, "properties": {
                         "requests": {"type": "object", "required": ["storage"], "additionalProperties": False,
                                      "properties": {"storage": {"type": "string"}}}}}}},
    },
}


# --- loading ------------------------------------------------------------------------------------------------------

def launcher_config(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "cluster" / f"{name}.yaml").read_text())


def kuberay_docs(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((KUBERAY_DIR / name).read_text()) if doc]


def all_kuberay_docs() -> Iterator[tuple[str, dict[str, Any]]]:
    for name in KUBERAY_FILES:
        for doc in kuberay_docs(name):
            yield name, doc


def the(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in all_kuberay_docs() if doc["kind"] == kind]


@functools.cache
def ray_schema() -> dict[str, Any]:
    """The schema `ray up` validates against, from the installed Ray (found without importing it)."""
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent
    return json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())


def strict(schema: Any) -> Any:
    """A copy of a CRD schema where an object with ``properties`` accepts no other field.

    The API server prunes unknown fields of a structural schema instead of rejecting them, so a typo
    (``minReplica``) would be dropped silently; here it is an error. Objects that declare
    ``additionalProperties`` or x-kubernetes-preserve-unknown-fields keep their meaning.
    """
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(plural: str, strict_fields: bool = True) -> jsonschema.Draft7Validator:
    schema = json.loads(gzip.decompress((CRD_DIR / f"{plural}.v1.schema.json.gz").read_bytes()))
    return jsonschema.Draft7Validator(strict(schema) if strict_fields else schema)


def schema_errors(validator: jsonschema.protocols.Validator, doc: Any) -> list[str]:
    return [f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
            for error in validator.iter_errors(doc)]


def kube_errors(doc: dict[str, Any], strict_fields: bool = True) -> list[str]:
    """Schema errors of one Kubernetes manifest, by its apiVersion and kind."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRDS:
        return schema_errors(crd_validator(CRDS[key], strict_fields), doc)
    if key == ("v1", "PersistentVolumeClaim"):
        return schema_errors(jsonschema.Draft7Validator(PVC_SCHEMA), doc)
    return [f"no schema for apiVersion {key[0]!r}, kind {key[1]!r}"]


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every RayCluster spec: the RayCluster's own and the one each RayService brings."""
    return ([(f"RayCluster {d['metadata']['name']}", d["spec"]) for d in the("RayCluster")]
            + [(f"RayService {d['metadata']['name']}", d["spec"]["rayClusterConfig"]) for d in the("RayService")])


def pod_templates(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


def runtime_envs() -> list[tuple[str, dict[str, Any]]]:
    """The runtime_env of each RayJob (runtimeEnvYAML) and of each Serve application (serveConfigV2)."""
    envs = [(f"RayJob {d['metadata']['name']}", yaml.safe_load(d["spec"]["runtimeEnvYAML"])) for d in the("RayJob")]
    for service in the("RayService"):
        for app in yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]:
            envs.append((f"RayService {service['metadata']['name']} app {app['name']}", app["runtime_env"]))
    return envs


def serve_config(service: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(service["spec"]["serveConfigV2"])


# --- what a config names in this repository --------------------------------------------------------------------

@functools.cache
def job_module(name: str):
    """A job script (jobs/NAME.py) as a module, without running it: its COMMAND, the digits-ray subcommand."""
    spec = importlib.util.spec_from_file_location(f"{name}_job", ROOT / "jobs" / f"{name}.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def entrypoint_problems(entrypoint: str) -> list[str]:
    """``python jobs/NAME.py FLAGS``: the script exists and its own argument parser accepts the flags."""
    argv = shlex.split(entrypoint)
    if len(argv) < 2 or argv[0] != "python" or not re.fullmatch(r"jobs/\w+\.py", argv[1]):
        return [f"{entrypoint!r}: expected `python jobs/NAME.py ...`"]
    if not (ROOT / argv[1]).is_file():
        return [f"{argv[1]} does not exist"]
    from digits_ray.cli import build_parser

    job = job_module(Path(argv[1]).stem)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            build_parser().parse_args([*job.COMMAND, *argv[2:]])
    except SystemExit:
        return [f"{argv[1]} refuses {argv[2:]}: {stderr.getvalue().strip().splitlines()[-1]}"]
    return []


def import_path_problems(import_path: str) -> list[str]:
    """``module:attribute`` names a top-level file of this repository that defines that attribute: assigned,
    def/class, imported, or answered by a module ``__getattr__`` (PEP 562) that compares against its name.

    Read with ``ast``, not imported: getting serve_app's ``app`` builds the application (and loads a model).
    """
    module, _, attribute = import_path.partition(":")
    file = ROOT / f"{module.replace('.', '/')}.py"
    if not attribute or not file.is_file():
        return [f"{import_path!r}: no file {file.relative_to(ROOT)} or no attribute after ':'"]
    tree = ast.parse(file.read_text())
    names = {target.id for node in tree.body if isinstance(node, ast.Assign | ast.AnnAssign)
             for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
             if isinstance(target, ast.Name)}
    names |= {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef)}
    names |= {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
              for alias in node.names}
    names |= {const.value for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
              for compare in ast.walk(node) if isinstance(compare, ast.Compare)
              for const in ast.walk(compare) if isinstance(const, ast.Constant) and isinstance(const.value, str)}
    return [] if attribute in names else [f"{file.relative_to(ROOT)} defines no top-level {attribute!r}"]


def runtime_env_problems(env: dict[str, Any]) -> list[str]:
    """What Ray itself would refuse, plus this project's rules: the repo zip as working_dir and as the
    pip package (one URL), the Keras switch, nothing Ray would silently take as a plugin (a typo)."""
    from ray.runtime_env import RuntimeEnv

    problems = [f"unknown runtime_env field {key!r}" for key in sorted(set(env) - RUNTIME_ENV_KEYS)]
    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as error:
        problems.append(f"Ray refuses it: {error}")
    url = env.get("working_dir", "")
    if not REPO_ZIP.fullmatch(url):
        problems.append(f"working_dir {url!r} is not a zip of this repository on GitHub")
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for requirement in env.get("pip", []):
        match = re.fullmatch(r"digits-ray(?:\[(\w+)\])? @ (\S+)", requirement)
        if not match or match[2] != url or (match[1] and match[1] not in extras):
            problems.append(f"pip {requirement!r}: expected `digits-ray[EXTRA] @ {url}` (EXTRA in {sorted(extras)})")
    if (env.get("env_vars") or {}).get("TF_USE_LEGACY_KERAS") != "1":
        problems.append("env_vars lack TF_USE_LEGACY_KERAS=1")
    return problems


def serve_config_problems(config: dict[str, Any]) -> list[str]:
    """Ray Serve's own schema, plus unknown fields (Serve's schema ignores them: a typo would be lost)."""
    from pydantic import ValidationError
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    problems = [f"unknown field {key!r}" for key in set(config) - set(ServeDeploySchema.model_fields)]
    for app in config.get("applications", []):
        problems += [f"app {app.get('name')}: unknown field {key!r}"
                     for key in set(app) - set(ServeApplicationSchema.model_fields)]
        problems += [f"app {app.get('name')}, deployment {d.get('name')}: unknown field {key!r}"
                     for d in app.get("deployments", []) for key in set(d) - set(DeploymentSchema.model_fields)]
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as error:
        problems.append(str(error))
    return problems


# --- `ray up`: cluster/aws.yaml, cluster/gcp.yaml ------------------------------------------------------------------

@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_matches_rays_schema(name):
    assert schema_errors(jsonschema.Draft7Validator(ray_schema()), launcher_config(name)) == []


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_ray_up_prepares_and_validates_the_launcher_config(name):
    """What `ray up` does with the file before it first calls the cloud: merge the provider's defaults,
    then validate (the schema again, head_node_type, the sum of min_workers against max_workers)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(launcher_config(name))
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert sum(t["max_workers"] for n, t in types.items() if n != prepared["head_node_type"]) == prepared["max_workers"]


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_node_types_cpu_head_cpu_workers_gpu_workers(name):
    config = launcher_config(name)
    types = config["available_node_types"]
    for node_type in types.values():  # whole numbers: Ray's schema, and what the autoscaler packs
        counts = {key: node_type[key] for key in ("min_workers", "max_workers") if key in node_type}
        for key, value in {**node_type["resources"], **counts}.items():
            assert type(value) is int and value >= 0, (key, value)
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head runs the drivers only"
    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    cpu = [t for t in workers.values() if t["resources"].get("GPU", 0) == 0 and t["resources"]["CPU"] > 0]
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert cpu and gpu and len(cpu) + len(gpu) == len(workers)
    assert any(t["min_workers"] >= 1 for t in cpu), "a job's first look at the cluster must find CPUs"
    assert config["docker"]["image"] == CPU_IMAGE
    for t in gpu:
        assert t["docker"]["worker_image"] == GPU_IMAGE and "--gpus all" in t["docker"]["worker_run_options"]
        assert t["worker_setup_commands"] == ['pip install --quiet -e "$HOME/digits-ray[gpu]"']
    assert config["setup_commands"] == ['pip install --quiet -e "$HOME/digits-ray"']


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_token_auth_environment_and_mounted_files(name):
    config = launcher_config(name)
    options = config["docker"]["run_options"]
    for option in ("--env RAY_AUTH_MODE=token", "--env TF_USE_LEGACY_KERAS=1", f"--volume {SHARED}:{SHARED}",
                   f"--env DIGITS_REGISTRY={SHARED}/models", f"--env DIGITS_CACHE_DIR={SHARED}/mnist"):
        assert option in options
    assert any("mount -t nfs" in c and c.endswith(f" {SHARED}") for c in config["initialization_commands"])
    mounts = config["file_mounts"]
    assert mounts.pop("~/.ray/auth_token") == "~/.ray/auth_token"  # the token of `ray get-auth-token --generate`
    for remote, local in mounts.items():  # this repository, what `pip install -e $HOME/digits-ray` needs
        assert remote == f"~/digits-ray/{Path(local).name}" and (ROOT / local).exists(), (remote, local)
    assert {Path(local).name for local in mounts.values()} >= {"pyproject.toml", "README.md", "digits_ray"}


@pytest.mark.parametrize("broken, where", [
    (lambda c: c["available_node_types"]["ray.worker.cpu"]["resources"].update(CPU="8"), "a string resource"),
    (lambda c: c["available_node_types"]["ray.worker.gpu"]["resources"].update(GPU=0.5), "a fractional GPU"),
    (lambda c: c["available_node_types"]["ray.worker.cpu"].update(min_worker=1), "a typo in a node type"),
    (lambda c: c.update(setup_command=[]), "a typo at the top level"),
    (lambda c: c["docker"].update(run_option=[]), "a typo in docker"),
])
def test_rays_schema_rejects_a_broken_launcher_config(broken: Callable[[dict], None], where: str):
    from ray.autoscaler._private.util import validate_config

    config = launcher_config("aws")
    broken(config)
    assert schema_errors(jsonschema.Draft7Validator(ray_schema()), config), where
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


# --- KubeRay: cluster/kuberay/*.yaml ---------------------------------------------------------------------------------

def test_the_vendored_crd_schemas_are_kuberays_v1_ones():
    for (_, kind), plural in CRDS.items():
        schema = crd_validator(plural, strict_fields=False).schema
        assert set(schema["properties"]) >= {"apiVersion", "kind", "metadata", "spec", "status"}, kind
    assert "authOptions" in crd_validator("rayclusters", strict_fields=False).schema["properties"]["spec"]["properties"]
    assert (CRD_DIR / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_every_kuberay_file_is_listed_here():
    assert sorted(path.name for path in KUBERAY_DIR.glob("*.yaml")) == sorted(KUBERAY_FILES)


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_manifests_match_the_crd_schemas_with_unknown_fields_as_errors(name):
    docs = kuberay_docs(name)
    assert docs
    for doc in docs:
        assert kube_errors(doc) == [], f"{name}: {doc['kind']} {doc['metadata']['name']}"


@pytest.mark.parametrize("broken, where", [
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplica=1), "a typo in a worker group"),
    (lambda d: d["spec"].update(workerGroupSpec=[]), "a typo in the spec"),
    (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(imagePullPolicys="Always"),
     "a typo in a pod template"),
])
def test_crd_schema_rejects_unknown_fields_that_the_api_server_would_drop(broken, where):
    (cluster,) = [d for d in kuberay_docs("raycluster.yaml") if d["kind"] == "RayCluster"]
    broken(cluster)
    assert kube_errors(cluster), where
    assert kube_errors(cluster, strict_fields=False) == [], "as published, the schema lets the typo through"


@pytest.mark.parametrize("broken, where", [
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplicas="8"), "a string where an integer goes"),
    (lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "rayStartParams: strings"),
    (lambda d: d["spec"]["authOptions"].update(mode="tokens"), "an unknown auth mode"),
    (lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"), "a required field missing"),
])
def test_crd_schema_rejects_wrong_types_and_values(broken, where):
    (cluster,) = [d for d in kuberay_docs("raycluster.yaml") if d["kind"] == "RayCluster"]
    broken(cluster)
    assert kube_errors(cluster, strict_fields=False), where


def test_unknown_kinds_are_errors():
    assert kube_errors({"apiVersion": "ray.io/v1alpha1", "kind": "RayJob"})
    assert kube_errors({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "x"},
                        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})


def test_clusters_autoscale_within_bounds_with_token_auth_and_the_projects_images():
    """KubeRay's own admission rules for these specs, and this project's layout of the groups."""
    assert len(the("RayCluster")) == 1 and the("RayCluster")[0]["metadata"]["name"] == CLUSTER_NAME
    for where, spec in cluster_specs():
        assert spec["enableInTreeAutoscaling"] is True, where
        assert spec["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET}, where
        assert spec["rayVersion"] == RAY_VERSION, where  # token auth needs >= 2.52.0; KubeRay checks rayVersion
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{where}: drivers only"
        groups = spec["workerGroupSpecs"]
        assert len({g["groupName"] for g in groups}) == len(groups), where
        for group in groups:
            assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
            assert group["maxReplicas"] >= 1, (where, group["groupName"])
        for group_name, pod in pod_templates(spec):
            (container,) = pod["containers"]
            limits = container["resources"]["limits"]
            assert container["resources"]["requests"] == limits, (where, group_name)  # Ray sizes itself by them
            gpus = limits.get("nvidia.com/gpu", 0)
            assert type(gpus) is int, (where, group_name)  # whole GPUs
            assert container["image"] == (GPU_IMAGE if gpus else CPU_IMAGE), (where, group_name)
    (cluster,) = the("RayCluster")
    gpus = [g for g in cluster["spec"]["workerGroupSpecs"] if "nvidia.com/gpu" in pod_limits(g)]
    cpus = [g for g in cluster["spec"]["workerGroupSpecs"] if "nvidia.com/gpu" not in pod_limits(g)]
    assert gpus and cpus and any(g["minReplicas"] >= 1 for g in cpus)


def pod_limits(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_every_pod_mounts_the_shared_volume_and_has_the_projects_environment():
    (claim,) = the("PersistentVolumeClaim")
    for where, spec in cluster_specs():
        for group_name, pod in pod_templates(spec):
            volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                       if "persistentVolumeClaim" in v}
            (container,) = pod["containers"]
            mounts = {m["mountPath"]: volumes.get(m["name"]) for m in container["volumeMounts"]}
            assert mounts.get(SHARED) == claim["metadata"]["name"], (where, group_name)
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["TF_USE_LEGACY_KERAS"] == "1" and env["DIGITS_REGISTRY"].startswith(SHARED), (where, group_name)
            assert "RAY_AUTH_TOKEN" not in env, "authOptions sets it, from the Secret"


def test_rayjobs_run_the_job_scripts_on_the_raycluster():
    jobs = {job["metadata"]["name"]: job for job in the("RayJob")}
    assert set(jobs) == {"digits-train", "digits-tune"}
    for name, job in jobs.items():
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": CLUSTER_NAME}, name
        assert "rayClusterSpec" not in job["spec"], name
        assert entrypoint_problems(job["spec"]["entrypoint"]) == [], name
    train, tune = (shlex.split(jobs[name]["spec"]["entrypoint"]) for name in ("digits-train", "digits-tune"))
    assert train[1] == "jobs/train.py" and tune[1] == "jobs/tune.py"
    from digits_ray.cli import build_parser

    train_args, tune_args = (build_parser().parse_args([*job_module(n).COMMAND, *argv[2:]])
                             for n, argv in (("train", train), ("tune", tune)))
    assert train_args.use_gpu and train_args.workers >= 2
    assert tune_args.gpus_per_trial == 0, "trials run on the cpu group"
    # Whatever a job writes must outlive the pod and be readable from the others.
    for path in (train_args.storage_path, train_args.out, tune_args.storage_path, tune_args.registry):
        assert str(path).startswith(f"{SHARED}/"), path


@pytest.mark.parametrize("entrypoint", [
    "python jobs/train.py --num-gpus 2",  # a flag train.py does not have (prefixes of its flags are fine)
    "python jobs/tune.py --time-budget soon",  # a value its parser refuses
    "python jobs/serve.py",  # no such script
    "python -m digits_ray train",  # not a job script
])
def test_entrypoint_check_rejects_what_the_scripts_would_refuse(entrypoint):
    assert entrypoint_problems(entrypoint)


def test_runtime_envs_bring_this_repository_and_its_dependencies():
    envs = runtime_envs()
    assert len(envs) == 3
    for where, env in envs:
        assert runtime_env_problems(env) == [], where
    assert len({env["working_dir"] for _, env in envs}) == 1, "one URL to set"
    by_job = {where: env for where, env in envs}
    assert by_job["RayJob digits-train"]["pip"][0].startswith("digits-ray[gpu] @ "), "GPU training needs CUDA"


@pytest.mark.parametrize("broken", [
    lambda env: env.update(workingdir=env.pop("working_dir")),
    lambda env: env.update(working_dir="https://github.com/someone/digits-ray/archive/main"),
    lambda env: env.update(pip=["digits-ray[cuda] @ " + env["working_dir"]]),
    lambda env: env["env_vars"].update(TF_USE_LEGACY_KERAS=1),
])
def test_runtime_env_check_rejects_broken_copies(broken):
    env = copy.deepcopy(runtime_envs()[0][1])
    broken(env)
    assert runtime_env_problems(env)


def test_rayservice_serves_serve_app_with_serves_own_config_schema():
    (service,) = the("RayService")
    config = serve_config(service)
    assert serve_config_problems(config) == []
    (app,) = config["applications"]
    assert (app["name"], app["import_path"], app["route_prefix"]) == ("digits", "digits_ray.serve.app:app", "/")
    assert import_path_problems(app["import_path"]) == []
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}, "KubeRay's Service reaches every proxy"
    (head,) = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert {"name": "serve", "containerPort": 8000} in head["ports"]


def test_rayservice_matches_the_serve_config_for_serve_deploy():
    """cluster/serve.yaml (`serve deploy`) and the RayService deploy the same application."""
    path = ROOT / "cluster" / "serve.yaml"
    assert path.is_file(), "cluster/serve.yaml (the config for `serve deploy`) is missing"
    ours = {app["name"]: app for app in serve_config(the("RayService")[0])["applications"]}
    theirs = {app["name"]: app for app in yaml.safe_load(path.read_text())["applications"]}
    assert set(ours) == set(theirs)
    for name, app in ours.items():
        assert (app["import_path"], app.get("route_prefix")) == (theirs[name]["import_path"],
                                                                  theirs[name].get("route_prefix")), name


def test_serve_configs_name_a_valid_user_config_and_serves_start_switches():
    """Both Serve configs give the deployment a user_config the replicas accept, and the RayService's pods
    start Ray with Ray's switches that settings.ray_start_env names (all but our wrapper and its settings,
    which the image lacks)."""
    from digits_ray.serve.settings import DEPLOYMENT_NAME, ModelChoice, ray_start_env

    service = the("RayService")[0]
    for config in (serve_config(service), yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())):
        (deployment,) = config["applications"][0]["deployments"]
        assert deployment["name"] == DEPLOYMENT_NAME
        ModelChoice.from_user_config(deployment["user_config"])
    wanted = {k: v for k, v in ray_start_env().items()  # Ray's switches; DIGITS_* are read by our wrapper only
              if k.startswith("RAY_SERVE_") and k != "RAY_SERVE_HAPROXY_BINARY_PATH"}
    for group, pod in pod_templates(service["spec"]["rayClusterConfig"]):
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert {k: env.get(k) for k in wanted} == wanted, group


@pytest.mark.parametrize("broken, check", [
    ("serve_app:application", import_path_problems),
    ("serve_apps:app", import_path_problems),
    ({"applications": [{"name": "digits", "import_path": "serve_app:app", "route_prefx": "/"}]},
     serve_config_problems),
    ({"applications": [{"name": "digits"}]}, serve_config_problems),
    ({"application": []}, serve_config_problems),
])
def test_serve_checks_reject_broken_copies(broken, check):
    assert check(broken)


def test_names_are_valid_kubernetes_names_within_kuberays_limits():
    limits = {"RayCluster": 53, "RayService": 47, "RayJob": 47}  # KubeRay: room for "-serve-svc", suffixes
    for _, doc in all_kuberay_docs():
        name = doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= limits.get(doc["kind"], 63), name
