"""Component configs refuse bad values with a ConfigError that names the setting (never a traceback later)."""

from __future__ import annotations

import pytest

from scheduler.service import SchedulerServiceConfig
from shared.transport.redis_io import RedisConfig
from shared.types.config import EngineConfig, PolicyConfig
from shared.types.errors import ConfigError

pytestmark = pytest.mark.unit

# label: (constructor, message)
BAD = {
    "engine dtype": (lambda: EngineConfig(dtype="float64"), "dtype 'float64'"),
    "draft dtype": (lambda: EngineConfig(draft_dtype="int8"), "draft_dtype 'int8'"),
    "prefill chunk 0": (lambda: EngineConfig(prefill_chunk=0), "prefill_chunk must be >= 1"),
    "token budget 0": (lambda: EngineConfig(token_budget=0), "token_budget must be >= 1"),
    "width 0": (lambda: PolicyConfig("specpipe", 2, 0), "width must be >= 1"),
    "negative draft wait": (
        lambda: SchedulerServiceConfig(RedisConfig(), 2, draft_wait_s=-0.1), "draft wait must be >= 0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_is_refused(case) -> None:
    make, message = BAD[case]
    with pytest.raises(ConfigError, match=message):
        make()


def test_bf16_draft_is_a_valid_setting() -> None:
    assert EngineConfig(draft_dtype="bfloat16").draft_dtype == "bfloat16"
