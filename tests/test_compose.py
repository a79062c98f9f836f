"""docker-compose.yml and the two-host compose files (deploy/two-hosts) agree with the code (docker itself
cannot run here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def _parsed(service: dict):
    import draft_worker.__main__ as draft_main
    import gateway.__main__ as gateway_main
    import gateway.batches.worker as batch_worker_main
    import scheduler.__main__ as scheduler_main
    import stage_worker.__main__ as stage_main

    cmd = service["command"]
    assert cmd[:2] == ["python", "-m"]
    parsers = {"scheduler": scheduler_main, "stage_worker": stage_main, "draft_worker": draft_main,
               "gateway": gateway_main, "gateway.batches.worker": batch_worker_main}
    return cmd[2], parsers[cmd[2]].parser().parse_args(cmd[3:])  # argparse exits on unknown flags


def test_stages_form_one_world(services) -> None:
    stages = sorted(n for n in services if n.startswith("stage-"))
    world = len(stages)
    assert stages == [f"stage-{k}" for k in range(world)]
    for k, name in enumerate(stages):
        module, args = _parsed(services[name])
        assert module == "stage_worker" and (args.rank, args.world) == (k, world)
    module, args = _parsed(services["scheduler"])
    assert module == "scheduler" and args.stages == world
    module, args = _parsed(services["gateway"])
    assert module == "gateway" and args.stages == world  # /ready checks every stage's heartbeat


def test_celery_worker_serves_the_gateways_cluster(services) -> None:
    module, args = _parsed(services["celery-worker"])
    _, gateway = _parsed(services["gateway"])
    assert module == "gateway.batches.worker"
    assert (args.model, args.stages, args.prefix) == (gateway.model, gateway.stages, gateway.prefix)


def test_each_stage_and_draft_has_its_own_gpu(services) -> None:
    gpus = []
    for name, service in services.items():
        if name.startswith(("stage-", "draft-")):
            devices = service["deploy"]["resources"]["reservations"]["devices"]
            assert len(devices) == 1 and devices[0]["driver"] == "nvidia"
            gpus += devices[0]["device_ids"]
    assert len(gpus) == len(set(gpus))


def test_models_and_network_agree(services) -> None:
    targets = {_parsed(s)[1].model for n, s in services.items() if n != "redis"}
    assert len(targets) == 1  # scheduler, stages and drafts serve one target
    for name, service in services.items():
        assert service.get("network_mode") == "host"  # NCCL over the host; Redis on loopback
    assert "--bind" in services["redis"]["command"] and "127.0.0.1" in services["redis"]["command"]


def test_dockerfile_installs_every_package() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for package in ("shared", "stage_worker", "draft_worker", "scheduler", "gateway", "specpipe"):
        assert f"COPY {package} {package}" in text


HOSTS = {"a": ROOT / "deploy/two-hosts/host-a.yml", "b": ROOT / "deploy/two-hosts/host-b.yml"}
ADDRESS = {"a": "${HOST_A_ADDR:?the address of host A}", "b": "${HOST_B_ADDR:?the address of host B}"}
PASSWORD = "${REDIS_PASSWORD:?a password for Redis}"  # Redis refuses other hosts without one


@pytest.fixture(scope="module")
def host_services() -> dict[str, dict]:
    return {host: yaml.safe_load(path.read_text())["services"] for host, path in HOSTS.items()}


def test_two_hosts_form_one_pipeline(host_services) -> None:
    """Stages 0-7 over both files form one world of one model; Redis and stage 0's rendezvous are host A's, and
    every process listens on its own host's address."""
    everything = {name: (host, s) for host, services in host_services.items() for name, s in services.items()}
    stages = sorted((n for n in everything if n.startswith("stage-")), key=lambda n: int(n.split("-")[1]))
    assert stages == [f"stage-{k}" for k in range(8)]
    for k, name in enumerate(stages):
        module, args = _parsed(everything[name][1])
        assert module == "stage_worker" and (args.rank, args.world) == (k, 8)
    for name in ("scheduler", "gateway", "celery-worker"):
        assert everything[name][0] == "a" and _parsed(everything[name][1])[1].stages == 8
    assert {_parsed(s)[1].model for n, (_, s) in everything.items() if n != "redis"} == {"qwen2.5-coder-1.5b"}
    for name, (host, service) in everything.items():
        if name == "redis":
            assert host == "a" and service["command"][service["command"].index("--bind") + 1] == ADDRESS["a"]
            assert service["command"][service["command"].index("--requirepass") + 1] == PASSWORD
            continue
        env = service["environment"]
        assert env["REDIS_URL"] == f"redis://:{PASSWORD}@{ADDRESS['a']}:6379/0" and env["MASTER_ADDR"] == ADDRESS["a"]
        assert env["SPECPIPE_CONTROL_HOST"] == ADDRESS[host], name
        assert service["network_mode"] == "host"


def test_two_hosts_give_each_gpu_one_process(host_services) -> None:
    for services in host_services.values():
        gpus = [d for s in services.values() for d in
                s.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])]
        ids = [i for d in gpus for i in d["device_ids"]]
        assert len(ids) == len(set(ids))
