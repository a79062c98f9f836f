"""docker-compose.yml agrees with the code (docker itself cannot run here)."""

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
