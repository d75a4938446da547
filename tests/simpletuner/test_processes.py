"""The job's processes and machines from --gpus or an accelerate file, and every contradiction as a user error."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd3tune.errors import Sd3tuneError
from sd3tune.simpletuner.processes import Processes, plan_processes

CONFIGS = Path(__file__).parents[2] / "configs" / "accelerate"


def test_gpus_alone_is_one_machine():
    assert plan_processes(3) == Processes(3)
    with pytest.raises(Sd3tuneError, match=r"--gpus 0 must be at least 1"):
        plan_processes(0)


def test_the_accelerate_file_sets_processes_and_machines_and_gpus_or_launch_args_override():
    assert plan_processes(1, CONFIGS / "multi_gpu.yaml") == Processes(2, 1, "multi_gpu.yaml")
    assert plan_processes(4, CONFIGS / "multi_gpu.yaml").total == 4
    node = plan_processes(1, CONFIGS / "multi_node.yaml", ["--machine_rank", "1"])
    assert (node.total, node.machines, node.here) == (16, 2, 8)
    assert plan_processes(1, CONFIGS / "multi_gpu.yaml", ["--num-processes=3"]).total == 3


@pytest.mark.parametrize("text,extra,needle", [
    ("num_processes: [2\n", [], "does not parse"),
    ("- just\n- a list\n", [], "not a mapping"),
    ("num_processes: two\n", [], "num_processes is 'two', not a whole number"),
    ("num_machines: 2\nnum_processes: 4\nmain_process_ip: 10.0.0.1\n", ["--num_machines", "1"],
     "names 2 machines but the launch says --num_machines 1"),
    ("num_machines: 2\nnum_processes: 3\nmain_process_ip: 10.0.0.1\n", [], "3 processes do not split evenly"),
    ("num_machines: 2\nnum_processes: 4\n", [], "no main_process_ip"),
    ("num_machines: 2\nnum_processes: 4\nmain_process_ip: h\n", ["--machine_rank=2"], "machine_rank 2 but the job"),
])
def test_a_broken_or_contradicting_accelerate_file_is_one_user_error(tmp_path, text, extra, needle):
    config = tmp_path / "acc.yaml"
    config.write_text(text)
    with pytest.raises(Sd3tuneError, match=None) as info:
        plan_processes(1, config, extra)
    assert needle in info.value.message and "\n" not in info.value.message


def test_several_machines_need_a_file():
    with pytest.raises(Sd3tuneError, match="needs an accelerate config file"):
        plan_processes(2, None, ["--num_machines", "2"])


def test_num_processes_after_the_dashes_that_contradicts_gpus_is_refused():
    # accelerate takes the last --num_processes (sd3tune's own, from --gpus, comes first): `train RUN -- --num_processes
    # 2` launched 2 processes on a 2-GPU machine while check, the launch line and the manifest counted 1
    for gpus, config in ((1, None), (4, CONFIGS / "multi_gpu.yaml")):
        with pytest.raises(Sd3tuneError) as info:
            plan_processes(gpus, config, ["--num_processes", "2"])
        assert info.value.message == f"--num_processes 2 after `--` contradicts --gpus {gpus}"
        assert "pass --gpus 2 instead" in info.value.hint
    assert plan_processes(2, None, ["--num_processes=2"]) == Processes(2)  # agreeing: nothing to refuse
