"""A stage's entry point (user_errors) ends a finished run's process group: a gloo group still
alive at interpreter exit can abort the process after its artifact was written."""

import pytest
import torch.distributed as dist
from omegaconf import OmegaConf

from pipeline.core.errors import PipelineError
from pipeline.core.runtime import user_errors


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_finished_stage_destroys_its_process_group(group):
    main = user_errors(lambda cfg: cfg.x + 1)
    assert main(OmegaConf.create({"x": 1})) == 2
    assert not dist.is_initialized()


def test_a_user_error_exits_2_with_one_line(capsys):
    def fails(cfg):
        raise PipelineError("data/x.jsonl line 3: no `prompt` field")

    with pytest.raises(SystemExit) as e:
        user_errors(fails)(OmegaConf.create({}))
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: data/x.jsonl line 3: no `prompt` field\n"
