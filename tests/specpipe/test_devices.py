"""One device per compute process: the --device and --dtype flags of the stage and draft workers, what
`specpipe up` passes them (and which GPU a bare cuda means for each), and the compose file's GPU services.
Also the attention settings `specpipe up` passes its stages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import draft_worker.__main__ as draft_main
import stage_worker.__main__ as stage_main
from shared.service_args import attention_config, compute_device, compute_dtype
from shared.types.config import AttentionConfig
from shared.types.errors import ConfigError
from specpipe.cluster import ClusterConfig, children, commands, up_main

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
PARSERS = {"stage_worker": stage_main.parser, "draft_worker": draft_main.parser}


def _compute(procs: dict[str, list[str]]):
    """(name, parsed arguments) of every stage and draft command line."""
    return [(name, PARSERS[cmd[2]]().parse_args(cmd[3:])) for name, cmd in procs.items() if cmd[2] in PARSERS]


def test_without_flags_each_process_picks_its_device_and_dtype() -> None:
    parsed = _compute(commands(ClusterConfig(stages=2, drafts=1, ngram_in="workers")))
    assert [name for name, _ in parsed] == ["stage-0", "stage-1", "draft-0"]
    for _, args in parsed:
        assert args.dtype is None  # the device's: bfloat16 on a GPU, float32 on a CPU
        assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_up_passes_device_and_dtypes_through() -> None:
    cfg = ClusterConfig(stages=3, drafts=2, device="cuda", dtype="float16", draft_dtype="bfloat16", draft_vocab=32768,
                        ngram_shared=4096, ngram_in="workers")
    for name, args in _compute(commands(cfg)):
        assert args.device == "cuda"
        assert args.dtype == ("bfloat16" if name.startswith("draft-") else "float16")
        assert not name.startswith("draft-") or (args.vocab, args.ngram_shared) == (32768, 4096)


# label: (flags, what the error says)
REFUSED = {"draft vocabulary 8": (["--draft-vocab", "8"], "at least 256"),
           "draft vocabulary -1": (["--draft-vocab", "-1"], "at least 256"),
           "n-gram table -1": (["--ngram-shared", "-1"], "--ngram-shared: ngram_shared must be >= 0")}


@pytest.mark.parametrize("case", list(REFUSED))
def test_up_refuses_a_bad_draft_setting_before_starting_anything(case, capsys) -> None:
    flags, message = REFUSED[case]
    with pytest.raises(SystemExit) as exc:
        up_main(flags)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("attention", [AttentionConfig(), AttentionConfig("distr", group_size=4, block_rows=64,
                                        layers="0,end-3-", layout="adjacent", fuse="sum_one", bucket="binary")],
                         ids=["default", "every-flag"])
def test_up_passes_every_attention_setting_to_the_stages(attention) -> None:
    stages = [args for name, args in _compute(commands(ClusterConfig(stages=2, attention=attention)))
              if name.startswith("stage-")]
    assert len(stages) == 2 and all(attention_config(args) == attention for args in stages)


def test_a_bare_cuda_means_the_stages_gpu_and_the_drafts_after_them() -> None:
    cfg = ClusterConfig(stages=3, drafts=2, device="cuda", api_keys=("k",), draft="qwen2.5-coder-0.5b")
    envs = {child.name: child.env for child in children(cfg)}
    ranks = {name: env["LOCAL_RANK"] for name, env in envs.items() if env and "LOCAL_RANK" in env}
    assert ranks == {"stage-0": "0", "stage-1": "1", "stage-2": "2", "draft-0": "3", "draft-1": "4"}
    assert envs["gateway"]["SPECPIPE_API_KEYS"] == "k" and envs["scheduler"] is None


# label: (--device, --dtype, LOCAL_RANK) -> the dtype, or the error's words
CHOICES = {
    "cpu, default dtype": ("cpu", None, "", torch.float32),
    "cpu, float16": ("cpu", "float16", "", torch.float16),
    "cpu, bfloat16": ("cpu", "bfloat16", "3", torch.bfloat16),
    "a gpu that is not there": ("cuda:99", None, "", "device 'cuda:99'"),
    "not a device": ("gpu", None, "", "unknown device"),
    "a LOCAL_RANK that is not a number": ("cpu", None, "first", "LOCAL_RANK"),
}


@pytest.mark.parametrize("case", list(CHOICES))
def test_device_and_dtype_choices(case, monkeypatch) -> None:
    device, dtype, local_rank, expected = CHOICES[case]
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    args = stage_main.parser().parse_args(["--rank", "1", "--world", "2", "--device", device]
                                          + (["--dtype", dtype] if dtype else []))
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=expected):
            compute_device(args, rank=1)
    else:
        assert compute_dtype(args.dtype, compute_device(args, rank=1)) == expected


@pytest.mark.parametrize("module", ["stage_worker", "draft_worker"])
def test_a_device_not_there_is_one_line_and_exit_2(module, capsys) -> None:
    argv = {"stage_worker": ["--rank", "0", "--world", "1"], "draft_worker": ["--draft", "tiny-random"]}[module]
    main = {"stage_worker": stage_main.main, "draft_worker": draft_main.main}[module]
    assert main([*argv, "--model", "tiny-random", "--device", "cuda:99"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: device 'cuda:99'")


def test_compose_gpu_services_compute_in_bfloat16_on_their_gpu() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    gpu = {name: s for name, s in services.items() if "deploy" in s}
    assert sorted(gpu) == ["draft-0", "stage-0", "stage-1", "stage-2", "stage-3"]
    for name, service in gpu.items():
        cmd = service["command"]
        args = PARSERS[cmd[2]]().parse_args(cmd[3:])
        assert args.device == "cuda", name  # the container sees its one GPU as cuda:0
        assert (args.dtype or "bfloat16") == "bfloat16", name
