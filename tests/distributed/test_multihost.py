"""multihost settings: explicit values, SLURM / GKE TPU / JobSet detection, named errors."""

import pytest

from lf_jax.distributed.coordination import preemption_notice
from lf_jax.distributed.multihost import (
    DistributedConfigError,
    detect_cluster,
    initialize,
    settings_from_env,
)


def test_no_environment_is_one_process():
    settings = settings_from_env({})
    assert not settings.is_multiprocess and settings.source == "single"
    assert initialize(settings) is settings  # no-op, jax already has 8 devices


def test_explicit_environment_and_timeouts():
    settings = settings_from_env(
        {
            "LF_JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234",
            "LF_JAX_NUM_PROCESSES": "4",
            "LF_JAX_PROCESS_ID": "3",
            "LF_JAX_HEARTBEAT_TIMEOUT": "5",
            "LF_JAX_LOCAL_DEVICE_IDS": "0,1",
        }
    )
    assert (settings.coordinator_address, settings.num_processes, settings.process_id) == (
        "10.0.0.2:1234",
        4,
        3,
    )
    assert settings.heartbeat_timeout_s == 5 and settings.shutdown_timeout_s == 60
    assert settings.local_device_ids == (0, 1) and settings.source == "env"


def test_arguments_win_over_environment():
    settings = settings_from_env(
        {
            "LF_JAX_NUM_PROCESSES": "4",
            "LF_JAX_PROCESS_ID": "3",
            "LF_JAX_COORDINATOR_ADDRESS": "a:1",
        },
        num_processes=2,
        process_id=1,
        heartbeat_timeout_s=7,
    )
    assert (settings.num_processes, settings.process_id, settings.heartbeat_timeout_s) == (2, 1, 7)
    assert settings.source == "args"
    assert not settings_from_env({"LF_JAX_NUM_PROCESSES": "4"}, mode="off").is_multiprocess


def test_slurm_detection():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NODELIST": "gpu[007-010,012],cpu1",
        "LF_JAX_COORDINATOR_PORT": "9999",
    }
    settings = settings_from_env(env)
    assert (
        settings.source,
        settings.coordinator_address,
        settings.num_processes,
        settings.process_id,
    ) == ("slurm", "gpu007:9999", 8, 5)
    assert (
        detect_cluster({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "node1"})[
            "coordinator_address"
        ]
        == "node1:8476"
    )


def test_gke_tpu_and_multislice_detection():
    hosts = "w-0.svc,w-1.svc,w-2.svc,w-3.svc"
    settings = settings_from_env({"TPU_WORKER_HOSTNAMES": hosts, "TPU_WORKER_ID": "2"})
    assert (
        settings.source,
        settings.coordinator_address,
        settings.num_processes,
        settings.process_id,
    ) == ("gke-tpu", "w-0.svc:8476", 4, 2)
    multi = settings_from_env(
        {
            "TPU_WORKER_HOSTNAMES": hosts,
            "TPU_WORKER_ID": "1",
            "MEGASCALE_NUM_SLICES": "2",
            "MEGASCALE_SLICE_ID": "1",
            "MEGASCALE_COORDINATOR_ADDRESS": "s0-w-0.svc:8080",
        }
    )
    assert (multi.coordinator_address, multi.num_processes, multi.process_id) == (
        "s0-w-0.svc:8476",
        8,
        5,
    )


def test_gke_jobset_needs_the_process_count():
    env = {"JOBSET_NAME": "ranker", "REPLICATED_JOB_NAME": "gpu", "JOB_COMPLETION_INDEX": "1"}
    with pytest.raises(DistributedConfigError, match="LF_JAX_NUM_PROCESSES"):
        settings_from_env(env)
    settings = settings_from_env({**env, "LF_JAX_NUM_PROCESSES": "2"})
    assert (settings.source, settings.coordinator_address, settings.process_id) == (
        "gke-jobset",
        "ranker-gpu-0-0.ranker:8476",
        1,
    )


@pytest.mark.parametrize(
    "env, message",
    [
        ({"LF_JAX_NUM_PROCESSES": "two"}, r"LF_JAX_NUM_PROCESSES='two' must be an integer >= 1"),
        ({"LF_JAX_NUM_PROCESSES": "2"}, r"coordinator_address and process_id"),
        (
            {
                "LF_JAX_NUM_PROCESSES": "2",
                "LF_JAX_PROCESS_ID": "2",
                "LF_JAX_COORDINATOR_ADDRESS": "h:1",
            },
            r"LF_JAX_PROCESS_ID='2' must be below the process count 2",
        ),
        (
            {
                "LF_JAX_NUM_PROCESSES": "2",
                "LF_JAX_PROCESS_ID": "0",
                "LF_JAX_COORDINATOR_ADDRESS": "h",
            },
            r"LF_JAX_COORDINATOR_ADDRESS='h' must be host:port",
        ),
        (
            {"LF_JAX_HEARTBEAT_TIMEOUT": "0"},
            r"LF_JAX_HEARTBEAT_TIMEOUT='0' must be an integer >= 1",
        ),
        ({"LF_JAX_DISTRIBUTED": "yes"}, r"LF_JAX_DISTRIBUTED='yes' must be one of"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, r"SLURM_STEP_NODELIST"),
    ],
)
def test_bad_values_are_named(env, message):
    with pytest.raises(DistributedConfigError, match=message):
        settings_from_env(env)


def test_initialize_after_jax_started_is_refused():
    settings = settings_from_env(
        {
            "LF_JAX_NUM_PROCESSES": "2",
            "LF_JAX_PROCESS_ID": "0",
            "LF_JAX_COORDINATOR_ADDRESS": "127.0.0.1:1",
        }
    )
    with pytest.raises(DistributedConfigError, match="before any jax computation"):
        initialize(settings)


def test_single_process_preemption_notice_catches_sigterm():
    import os
    import signal

    with preemption_notice() as reached:
        assert not reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert reached(2)
    assert signal.getsignal(signal.SIGTERM) is not None


def test_cpu_devices_from_env():
    from lf_jax.distributed.multihost import cpu_devices_from_env

    assert (
        cpu_devices_from_env({}) is None and cpu_devices_from_env({"LF_JAX_CPU_DEVICES": "4"}) == 4
    )
    with pytest.raises(DistributedConfigError, match="LF_JAX_CPU_DEVICES='x'"):
        cpu_devices_from_env({"LF_JAX_CPU_DEVICES": "x"})
