"""Static checks of the deployment files: docker-compose.yml and the Kubernetes sketch in
docs/k8s/*.yaml (docs/deploy.md). Nothing is started: Docker and a cluster are not available
here, so these tests read the files with PyYAML and check them against the code they run:

- every ``LMFORGE_*``, ``DATABASE_URL`` and ``REDIS_URL`` variable they set is an alias of
  :class:`store.settings.Settings` (a few others are read elsewhere: ``OTHER_ENV``), and every
  ``AWS_*`` one is a variable boto3 reads (``AWS_ENV``);
- every ``lmforge`` command they run parses with the real parser,
  :func:`lmforge.cli.build_parser`, and a worker's ``--queues`` are queues that
  :mod:`core.routing` routes jobs to, with ``-xN`` queues only on ``--gpus-per-job N`` workers;
- images are pinned (a tag, never ``latest``);
- compose: a worker service can be scaled (no container_name, no host port, no named volume),
  every ``depends_on`` names a service (with a healthcheck where it waits for health), the
  bucket created is the storage URL's, workers' stop grace period is above the soft shutdown;
- Kubernetes: every object has apiVersion/kind/metadata.name and validates against the
  official schemas (``kubernetes-validate``, strict: unknown fields are errors); Deployments'
  selectors match their pod labels, Services select a Deployment's pods, probes ask paths the
  API and the inference server serve, GPU workers' ``--gpus`` match their ``nvidia.com/gpu``
  limit, workers' ``terminationGracePeriodSeconds`` is above the soft shutdown timeout.

hadolint (Dockerfile) and dclint (docker-compose.yml, against the Compose schema) run in
``make lint``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.routing import DEVICE_QUEUES, queue_name
from lmforge.cli import build_parser
from store.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S_DIR = ROOT / "docs" / "k8s"
K8S_FILES = sorted(K8S_DIR.glob("*.yaml"))
#: The Kubernetes version the manifests are validated against (kubernetes-validate's schemas).
K8S_VERSION = "1.30"

#: The variables boto3 reads that the deployment files may set (the standard AWS ones).
AWS_ENV = {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
           "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_SESSION_TOKEN"}
#: LMForge variables read outside Settings, and the file that reads each.
OTHER_ENV = {"LMFORGE_LOG_FORMAT": "store/logs.py"}
#: The variables whose names these tests check (others, e.g. MINIO_*, belong to other images).
CHECKED_ENV = re.compile(r"^(LMFORGE_\w+|DATABASE_URL|REDIS_URL|AWS_\w+)$")

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}: compose interpolation.
_INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, given: dict[str, str] | None = None) -> str:
    """``value`` as compose reads it with only the variables ``given`` set: each
    ``${VAR:-default}`` replaced by its default. A variable neither given nor with a default
    fails the test (the file would not run without it)."""

    def default(m: re.Match[str]) -> str:
        if given and m.group("name") in given:
            return given[m.group("name")]
        if m.group("op") not in (":-", "-"):
            pytest.fail(f"{value!r}: ${{{m.group('name')}}} has no default")
        return m.group("arg")

    return _INTERPOLATION.sub(default, value)


def setting_aliases() -> set[str]:
    return {f.alias for f in Settings.model_fields.values() if f.alias}


def check_env_names(names: list[str], where: str) -> None:
    """Fail unless every LMForge/boto3 variable in ``names`` is read by something."""
    aliases = setting_aliases()
    for name in names:
        if not CHECKED_ENV.match(name):
            continue
        if name.startswith("AWS_"):
            assert name in AWS_ENV, f"{where}: {name} is not a variable boto3 reads"
        elif name in OTHER_ENV:
            assert name in (ROOT / OTHER_ENV[name]).read_text(), f"{where}: {name} is not read"
        else:
            assert name in aliases, f"{where}: {name} is not a setting (store.settings.Settings)"


def parse_command(args: list[str], where: str) -> list[str]:
    """Parse ``lmforge ARGS`` with the real parser; fail with argparse's message if it would
    not start. Returns ``args``."""
    try:
        build_parser().parse_args(args)
    except SystemExit as exc:  # argparse has printed why (captured by pytest)
        pytest.fail(f"{where}: `lmforge {' '.join(args)}` does not parse (exit {exc.code})")
    return args


def option(args: list[str], flag: str) -> str | None:
    """The value of ``flag`` in ``args`` (``--flag V`` or ``--flag=V``), or None."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def known_queues(world_size: int) -> set[str]:
    """The queues core.routing sends jobs of ``world_size`` processes to."""
    return {queue_name(device, world_size) for device in DEVICE_QUEUES}


def check_worker_queues(args: list[str], where: str) -> list[str]:
    """A worker's ``--queues`` are routed-to queues; ``-xN`` ones only with
    ``--gpus-per-job N`` (and then only those). Returns the queues."""
    queues = (option(args, "--queues") or "").split(",")
    per_job = int(option(args, "--gpus-per-job") or 1)
    assert queues != [""], f"{where}: a worker of the deployment files names its --queues"
    for q in queues:
        assert q in known_queues(per_job), (
            f"{where}: queue {q!r} is not one core.routing routes {per_job}-process jobs to "
            f"({sorted(known_queues(per_job))})")
    if per_job > 1:
        gpus = (option(args, "--gpus") or "").split(",")
        assert len(gpus) % per_job == 0, f"{where}: --gpus {gpus} is not whole jobs of {per_job}"
    return queues


def check_image_pinned(image: str, where: str) -> None:
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag and tag not in ("", "latest"), (
        f"{where}: image {image!r} is not pinned to a release tag")


def seconds(duration: str | int | float) -> float:
    """A compose duration ("60s", "1m30s", "90") in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)?", duration)
    unit = {"h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * unit[u] for n, u in parts)


# ----------------------------------------------------------------------------------------------
# docker-compose.yml


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def lmforge_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the LMForge image (built from the Dockerfile)."""
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def env_of(service: dict[str, Any], given: dict[str, str] | None = None) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["NAME=value", ...]
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): interpolate(str(v), given) for k, v in env.items()}


def test_compose_lmforge_services_set_only_real_settings(compose: dict[str, Any]) -> None:
    services = lmforge_services(compose)
    assert {"api", "worker", "inference", "migrate"} <= set(services)
    for name, svc in services.items():
        env = env_of(svc)
        check_env_names(list(env), f"docker-compose.yml service {name}")
        if name != "migrate":
            # Shared object storage: nothing a process needs is on a local volume.
            assert env["LMFORGE_STORAGE_URL"].startswith("s3://"), name
            assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                    "AWS_DEFAULT_REGION"} <= set(env), name
        Settings.model_validate(env)  # the values validate too (types, bounds)


def test_compose_commands_parse(compose: dict[str, Any]) -> None:
    for name, svc in lmforge_services(compose).items():
        command = svc.get("command")
        assert isinstance(command, list), f"{name}: command as a list (exec form)"
        args = parse_command([interpolate(str(a)) for a in command], f"compose {name}")
        if args[0] == "worker":
            check_worker_queues(args, f"compose {name}")


def test_compose_images_pinned(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        if "build" not in svc:
            check_image_pinned(interpolate(svc["image"]), f"compose {name}")


def test_compose_workers_scale(compose: dict[str, Any]) -> None:
    """`docker compose up --scale worker=N`: a worker has no fixed name, no host port and no
    named (shared) volume; no service anywhere has a container_name."""
    named_volumes = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        assert "container_name" not in svc, name
        if not name.startswith("worker"):
            continue
        assert "ports" not in svc, f"{name}: a host port cannot be shared by replicas"
        for volume in svc.get("volumes") or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source")
            assert source not in named_volumes, f"{name}: shared volume {source}"


def test_compose_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for dep, how in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if how.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health"
            if how.get("condition") == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} is one-shot"


def test_compose_bucket_is_the_storage_bucket(compose: dict[str, Any]) -> None:
    """minio-setup creates the bucket the services' LMFORGE_STORAGE_URL names."""
    setup = compose["services"]["minio-setup"]
    target = setup["command"][-1]  # mc mb --ignore-existing ALIAS/BUCKET
    assert setup["command"][0] == "mb"
    bucket = target.split("/", 1)[1]
    for name, svc in lmforge_services(compose).items():
        url = env_of(svc).get("LMFORGE_STORAGE_URL")
        if url:
            assert url.removeprefix("s3://").split("/", 1)[0] == bucket, name
    alias = target.split("/", 1)[0]
    assert f"MC_HOST_{alias}" in setup["environment"]


def test_compose_workers_outlast_soft_shutdown(compose: dict[str, Any]) -> None:
    for name, svc in lmforge_services(compose).items():
        if svc["command"][0] != "worker":
            continue
        soft = Settings.model_validate(env_of(svc)).soft_shutdown_timeout_s
        grace = seconds(svc.get("stop_grace_period", "10s"))
        assert grace > soft, f"{name}: stop_grace_period {grace} s <= soft shutdown {soft} s"


def test_compose_gpu_worker_reserves_its_gpus(compose: dict[str, Any]) -> None:
    """The GPU worker's --gpus list is as long as its device reservation."""
    svc = compose["services"]["worker-cuda"]
    gpus = option([interpolate(str(a)) for a in svc["command"]], "--gpus")
    assert gpus is not None
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert int(interpolate(str(device["count"]))) == len(gpus.split(","))


def test_two_machine_overrides(compose: dict[str, Any]) -> None:
    """docs/compose/machine-{a,b}.yml (docs/deploy.md, "Two machines"): machine B's workers
    reach PostgreSQL, Redis and MinIO at machine A's address, on the ports machine A
    publishes, and by no name that exists only on machine A's compose network."""
    machine_a = "10.0.0.1"
    given = {"LMFORGE_MACHINE_A": machine_a, "LMFORGE_PRIVATE_IP": machine_a}
    a = yaml.safe_load((ROOT / "docs/compose/machine-a.yml").read_text())
    b = yaml.safe_load((ROOT / "docs/compose/machine-b.yml").read_text())
    published = set()
    for name, svc in a["services"].items():
        assert name in compose["services"], name
        for port in svc["ports"]:
            assert interpolate(port["host_ip"], given) == machine_a, name
            published.add(int(port["published"]))
    local_names = set(compose["services"])
    for name, svc in b["services"].items():
        base = compose["services"][name]
        env = env_of(base) | env_of(svc, given)  # compose merges environment by name
        check_env_names(list(env), f"docs/compose/machine-b.yml {name}")
        Settings.model_validate(env)
        for var in ("DATABASE_URL", "REDIS_URL", "AWS_ENDPOINT_URL"):
            host_port = env[var].split("@")[-1].split("://")[-1].split("/")[0]
            host, port = host_port.rsplit(":", 1)
            assert host == machine_a and int(port) in published, f"{name} {var}: {env[var]}"
        for var, value in env.items():
            hosts = set(re.findall(r"[/@]([\w.-]+):\d+", value))
            assert not hosts & local_names, f"{name} {var}: {value} names machine A's services"


# ----------------------------------------------------------------------------------------------
# docs/k8s/*.yaml


def k8s_objects() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in K8S_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path.name, doc


@pytest.fixture(scope="module")
def objects() -> list[tuple[str, dict[str, Any]]]:
    found = list(k8s_objects())
    assert found, "docs/k8s/*.yaml holds no objects"
    return found


def of_kind(objects: list[tuple[str, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [obj for _, obj in objects if obj["kind"] == kind]


def pod_specs(objects: list[tuple[str, dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(object name, pod spec) of every Deployment and Job."""
    for _, obj in objects:
        if obj["kind"] in ("Deployment", "Job"):
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]


def is_lmforge_image(image: str) -> bool:
    return image.rpartition(":")[0].rsplit("/", 1)[-1] == "lmforge"


def test_k8s_objects_are_valid(objects: list[tuple[str, dict[str, Any]]]) -> None:
    import jsonschema
    import kubernetes_validate

    kinds = {obj["kind"] for _, obj in objects}
    assert {"ConfigMap", "Secret", "Deployment", "Service"} <= kinds
    names: set[tuple[str, str]] = set()
    invalid: list[str] = []
    for file, obj in objects:
        assert obj.get("apiVersion") and obj.get("kind"), file
        name = (obj.get("metadata") or {}).get("name")
        assert name, f"{file}: a {obj['kind']} without metadata.name"
        assert "namespace" not in obj["metadata"], f"{file}: {name} names a namespace"
        assert (obj["kind"], name) not in names, f"{file}: {obj['kind']} {name} twice"
        names.add((obj["kind"], name))
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            # (strict mode's unknown fields come as jsonschema's own error)
            where = ".".join(str(p) for p in getattr(exc, "path", ()))
            invalid.append(f"{file}: {obj['kind']} {name}: {where}: "
                           f"{getattr(exc, 'message', exc)}")
    assert not invalid, "\n".join(invalid)


def test_k8s_selectors_match(objects: list[tuple[str, dict[str, Any]]]) -> None:
    pod_labels = []
    for dep in of_kind(objects, "Deployment"):
        selector = dep["spec"]["selector"]["matchLabels"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), dep["metadata"]["name"]
        pod_labels.append((dep, labels))
    for service in of_kind(objects, "Service"):
        selected = [d for d, labels in pod_labels
                    if service["spec"]["selector"].items() <= labels.items()]
        assert len(selected) == 1, f"Service {service['metadata']['name']} selects {selected}"
        (dep,) = selected
        container_ports = {p["name"]: p["containerPort"]
                           for c in dep["spec"]["template"]["spec"]["containers"]
                           for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports or \
                port["targetPort"] in container_ports.values(), service["metadata"]["name"]


def test_k8s_env_is_real_settings(objects: list[tuple[str, dict[str, Any]]]) -> None:
    config = {o["metadata"]["name"]: o.get("data", {}) for o in of_kind(objects, "ConfigMap")}
    secrets = {o["metadata"]["name"]: o.get("stringData", {}) for o in of_kind(objects, "Secret")}
    for name, data in [*config.items(), *secrets.items()]:
        check_env_names(list(data), f"docs/k8s {name}")
    for name, pod in pod_specs(objects):
        for container in pod["containers"]:
            env: dict[str, str] = {}
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    env |= config[source["configMapRef"]["name"]]
                else:
                    env |= secrets[source["secretRef"]["name"]]
            env |= {e["name"]: e.get("value", "") for e in container.get("env", [])}
            check_env_names(list(env), f"docs/k8s {name}")
            if is_lmforge_image(container["image"]):
                assert env["LMFORGE_STORAGE_URL"].startswith("s3://"), name
                Settings.model_validate(env)


def test_k8s_commands_parse_and_images_pinned(
        objects: list[tuple[str, dict[str, Any]]]) -> None:
    workers = 0
    for name, pod in pod_specs(objects):
        for container in pod["containers"]:
            check_image_pinned(container["image"], f"docs/k8s {name}")
            if not is_lmforge_image(container["image"]):
                continue
            command = container.get("command", [])
            assert command in ([], ["lmforge"]), f"{name}: the image's entrypoint is lmforge"
            args = parse_command([str(a) for a in container["args"]], f"docs/k8s {name}")
            if args[0] != "worker":
                continue
            workers += 1
            check_worker_queues(args, f"docs/k8s {name}")
            gpus = option(args, "--gpus")
            limit = container["resources"].get("limits", {}).get("nvidia.com/gpu")
            if gpus is None:
                assert limit is None, f"{name}: GPUs reserved, but no --gpus"
            else:
                assert limit == len(gpus.split(",")), f"{name}: --gpus {gpus} vs {limit} GPUs"
    assert workers >= 2, "one worker Deployment per queue: cpu and cuda at least"


def test_k8s_workers_outlast_soft_shutdown(objects: list[tuple[str, dict[str, Any]]]) -> None:
    (config,) = of_kind(objects, "ConfigMap")
    soft = float(config["data"]["LMFORGE_SOFT_SHUTDOWN_TIMEOUT_S"])
    for name, pod in pod_specs(objects):
        if any(c.get("args", [""])[0] == "worker" for c in pod["containers"]):
            grace = pod.get("terminationGracePeriodSeconds", 30)
            assert grace > soft, f"{name}: grace {grace} s <= soft shutdown {soft} s"


def test_k8s_probes_ask_served_paths(objects: list[tuple[str, dict[str, Any]]],
                                     tmp_path: Path) -> None:
    """The API's and the inference server's probes ask routes those apps have (a POST to a
    GET-only route answers 405, to a missing one 404: nothing behind the route runs), outside
    /v1 (no API key), on the container's --port."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from app.routes import health_router
    from store.storage import LocalStorage
    from worker.serve.app import create_app

    api = FastAPI()
    api.include_router(health_router)  # at the root, as app.main mounts it
    serve = create_app(Settings(LMFORGE_HOME=tmp_path, LMFORGE_INFERENCE_DEVICE="cpu"),
                       LocalStorage(tmp_path))
    clients = {"api": TestClient(api), "serve": TestClient(serve)}
    probed = 0
    for name, pod in pod_specs(objects):
        for container in pod["containers"]:
            args = container.get("args", [""])
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
                probe = container.get(kind)
                if probe is None:
                    continue
                assert args[0] in clients, f"{name}: a probe on `lmforge {args[0]}`"
                get = probe["httpGet"]
                status = clients[args[0]].post(get["path"]).status_code
                assert status == 405, f"{name} {kind}: no GET route {get['path']} ({status})"
                port = ports.get(get["port"], get["port"])
                assert str(port) == option(args, "--port"), f"{name} {kind}: port {port}"
                probed += 1
    assert probed >= 4
