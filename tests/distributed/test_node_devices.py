"""One process per node drives all of the node's GPUs (simulated SLURM / JobSet env)."""

import pytest
from jax._src import clusters

from lf_jax.distributed.multihost import settings_from_env
from lf_jax.distributed.node_devices import (
    NodeDevicesError,
    node_local_device_ids,
    tasks_on_node,
    visible_gpu_count,
)

# the simulated node: process 1 of 4, one task per node, local rank 0
SLURM = {
    "SLURM_JOB_ID": "77",
    "SLURM_STEP_NODELIST": "gpu[001-004]",
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "1",
}


def test_one_task_per_node_gets_every_visible_gpu(tmp_path):
    for extra in (
        {"CUDA_VISIBLE_DEVICES": "4,5,6,7"},  # renumbered 0-3 inside the process
        {"SLURM_GPUS_ON_NODE": "4"},
        {"SLURM_STEP_GPUS": "0,1,2,3"},
    ):
        settings = settings_from_env({**SLURM, **extra})
        assert (settings.source, settings.process_id) == ("slurm", 1)
        assert settings.local_device_ids == (0, 1, 2, 3), extra
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):  # no scheduler variable
        (tmp_path / name).touch()
    assert node_local_device_ids(SLURM, dev_dir=tmp_path) == (0, 1)


def test_jax_keeps_the_ids_instead_of_the_local_rank(monkeypatch):
    """What jax.distributed.initialize does with the ids lf_jax passes under SLURM."""
    for key, value in {**SLURM, "SLURM_GPUS_ON_NODE": "8"}.items():
        monkeypatch.setenv(key, value)
    settings = settings_from_env()
    detected = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        settings.coordinator_address, 4, 1, list(settings.local_device_ids), None, 10
    )
    assert list(detected[3]) == list(range(8))
    unset = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        settings.coordinator_address, 4, 1, None, None, 10
    )
    assert list(unset[3]) == [0]  # jax's own fill-in: GPU 0 only


def test_several_tasks_per_node_or_no_gpu_leave_jax_its_default(tmp_path):
    assert node_local_device_ids({**SLURM, "SLURM_NTASKS_PER_NODE": "8"}, tmp_path) is None
    assert node_local_device_ids({**SLURM, "CUDA_VISIBLE_DEVICES": ""}, tmp_path) is None
    assert node_local_device_ids(SLURM, dev_dir=tmp_path) is None  # CPU node
    assert tasks_on_node({"SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"}) == 1
    assert tasks_on_node({"SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "2"}) == 2


def test_explicit_ids_win_and_jobset_pods_get_their_gpus(tmp_path):
    env = {**SLURM, "CUDA_VISIBLE_DEVICES": "0,1,2,3", "LF_JAX_LOCAL_DEVICE_IDS": "2"}
    assert settings_from_env(env).local_device_ids == (2,)
    pod = {
        "JOBSET_NAME": "js",
        "JOB_COMPLETION_INDEX": "1",
        "LF_JAX_NUM_PROCESSES": "2",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
    }
    assert settings_from_env(pod).local_device_ids == tuple(range(8))
    assert "local devices [0, 1, 2, 3, 4, 5, 6, 7]" in settings_from_env(pod).describe()


@pytest.mark.parametrize(
    "env, message",
    [
        ({"SLURM_GPUS_ON_NODE": "four"}, "SLURM_GPUS_ON_NODE='four'"),
        ({"CUDA_VISIBLE_DEVICES": "0", "SLURM_TASKS_PER_NODE": "2x"}, "SLURM_TASKS_PER_NODE"),
    ],
)
def test_bad_variables_are_named(env, message, tmp_path):
    with pytest.raises(NodeDevicesError, match=message):
        node_local_device_ids(env, tmp_path)
    assert visible_gpu_count({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, tmp_path) == 0
