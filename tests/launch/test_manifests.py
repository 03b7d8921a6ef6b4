"""The SLURM script and GKE JobSet manifests parse and give multihost what it detects."""

import subprocess

import pytest

from lf_jax.distributed.multihost import settings_from_env

yaml = pytest.importorskip("yaml")


def test_slurm_script_is_valid_bash_and_runs_lf_jax_with_srun(repo_root):
    path = f"{repo_root}/launch/slurm/train.sbatch"
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    text = open(path).read()
    assert "srun --kill-on-bad-exit=1" in text and "lf-jax train" in text
    assert "#SBATCH --signal=TERM@" in text


def _container(doc):
    job = doc["spec"]["replicatedJobs"][0]
    return job, job["template"]["spec"]["template"]["spec"]["containers"][0]


def test_gpu_jobset_env_resolves_to_the_process_group(repo_root):
    doc = yaml.safe_load(open(f"{repo_root}/launch/gke/gpu-jobset.yaml"))
    job, container = _container(doc)
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert int(env["LF_JAX_NUM_PROCESSES"]) == job["template"]["spec"]["parallelism"]
    pod_env = {
        "JOBSET_NAME": doc["metadata"]["name"],
        "REPLICATED_JOB_NAME": job["name"],
        "JOB_COMPLETION_INDEX": "1",
        "LF_JAX_NUM_PROCESSES": env["LF_JAX_NUM_PROCESSES"],
    }
    settings = settings_from_env(pod_env)
    assert settings.coordinator_address == "lf-jax-ranker-gpu-workers-0-0.lf-jax-ranker-gpu:8476"
    assert (settings.num_processes, settings.process_id) == (2, 1)


def test_tpu_jobset_runs_one_pod_per_host(repo_root):
    doc = yaml.safe_load(open(f"{repo_root}/launch/gke/tpu-jobset.yaml"))
    job, container = _container(doc)
    spec = job["template"]["spec"]
    assert spec["parallelism"] == spec["completions"] == 4
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    assert container["command"][:2] == ["lf-jax", "train"]


def test_slurm_script_requests_gpus_and_each_node_drives_them_all(repo_root):
    text = open(f"{repo_root}/launch/slurm/train.sbatch").read()
    assert "#SBATCH --gpus-per-node=" in text and "#SBATCH --ntasks-per-node=1" in text
    node = {  # what srun sets on node 2 of 4 for that script
        "SLURM_PROCID": "2",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "2",
        "SLURM_STEP_NODELIST": "gpu[001-004]",
        "SLURM_STEP_TASKS_PER_NODE": "1(x4)",
        "SLURM_GPUS_ON_NODE": "8",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
    }
    assert settings_from_env(node).local_device_ids == tuple(range(8))


def test_manifests_write_to_local_paths_and_name_packaged_configs(repo_root):
    for name in ("tpu-jobset.yaml", "gpu-jobset.yaml"):
        _, container = _container(yaml.safe_load(open(f"{repo_root}/launch/gke/{name}")))
        command = container["command"]
        workdir = command[command.index("--workdir") + 1]
        assert workdir.startswith("/") and "://" not in workdir, (name, workdir)
        assert command[command.index("--config") + 1] == "feed_ranker:size=large"
        mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
        assert any(workdir.startswith(m) for m in mounts), (name, mounts)
