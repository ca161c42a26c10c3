"""Multi-process training (2 processes x 2 CPU devices over gloo == 1 process x 4 devices), FSDP and
remat switches, bfloat16 tolerance. Each run is a subprocess with its own fake device count."""

import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import checkpoint, parallel, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# argv: workdir, config overrides as JSON, [coordinator, num_processes, process_id]
_WORKER = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    from vit_jax import parallel
    if len(sys.argv) > 3:
        parallel.initialize(sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    import jax, os
    from vit_jax import commands, train
    if os.environ.get("NO_MEMORY_LEFT_ON") == str(jax.process_index()):
        commands.host_memory_left_bytes = lambda: 0
    from test_train import tiny_config
    if os.environ.get("FAKE_CIFAR10"):  # TFDS's fetch replaced by the test's archive, and logged
        import tensorflow_datasets as tfds
        def fetch(self, url):
            with open(os.environ["FETCH_LOG"], "a") as f:
                f.write(f"{{jax.process_index()}}\\n")
            return os.environ["FAKE_CIFAR10"]
        tfds.download.DownloadManager.download_and_extract = fetch
        from vit_jax import input_pipeline
        input_pipeline.unreachable = lambda urls: None  # (these machines have no network)
    config = tiny_config(total_steps=6, eval_every=3, checkpoint_every=3, batch=16, batch_eval=16)
    config.model_overrides["dropout_rate"] = 0.1
    for key, value in json.loads(sys.argv[2]).items():
        config[key] = value
    result = train.train_and_evaluate(config, sys.argv[1])
    if jax.process_index() == 0:
        rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
        print(json.dumps({{
            "devices": jax.device_count(), "processes": jax.process_count(),
            "losses": [r["train_loss"] for r in rows],
            "accuracy": result["accuracy"], "num_examples": result["num_examples"],
            "micro_batches": result["micro_batches"],
        }}))
    """
).format(tests=os.path.join(REPO, "tests"))


def devices_env(devices: int, **extra: str) -> dict:
    """The environment of a subprocess with `devices` fake CPU devices: this one's, its XLA_FLAGS
    (tests/conftest.py's) kept, plus `extra`."""
    return {
        **os.environ,
        "XLA_FLAGS": os.environ["XLA_FLAGS"] + f" --xla_force_host_platform_device_count={devices}",
        **extra,
    }


def _single(workdir, devices: int, env=None, **overrides) -> dict:
    """The worker's result, and its stderr under "stderr"."""
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER, str(workdir), json.dumps(overrides)],
        capture_output=True, text=True, env=devices_env(devices, **(env or {})), timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "stderr": proc.stderr}


def _singles(*runs: tuple) -> list[dict]:
    """`_single(*run)` for each run, side by side (a tiny model's run is mostly start-up and
    compilation, which use one core)."""
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
        futures = [pool.submit(_single, *run[:-1], **run[-1]) for run in runs]
    return [f.result() for f in futures]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _multi(
    workdir,
    processes: int,
    devices_each: int,
    timeout: float = 300,
    env=None,
    check=True,
    **overrides,
) -> dict | list:
    """Starts `processes` workers on loopback; kills them all if any fails (with `check`) or time
    runs out. Returns process 0's result, or without `check` each one's (exit status, stderr)."""
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WORKER,
                str(workdir),
                json.dumps(overrides),
                address,
                str(processes),
                str(i),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # Without the session's compilation cache: with jax 0.12.1 a second multi-process CPU
            # run of a program that an earlier one cached hangs in its first step (README).
            env=devices_env(devices_each, JAX_ENABLE_COMPILATION_CACHE="false", **(env or {})),
            cwd=REPO,
        )
        for i in range(processes)
    ]
    deadline = time.monotonic() + timeout
    try:
        outputs, ends = [], []
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert p.returncode == 0 or not check, err[-3000:]
            outputs.append(out)
            ends.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return json.loads(outputs[0].strip().splitlines()[-1]) if check else ends


def test_two_processes_of_two_devices_equal_one_process_of_four(tmp_path):
    # The two-process run stops at step 3 (total_steps=3), then a second one resumes to step 6: the
    # checkpoint is written and restored collectively by both processes, and the resumed run ends
    # like one process's uninterrupted run (resuming is exact: test_train's interrupted run).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the one-process run alongside
        single = pool.submit(_single, tmp_path / "one", 4, total_steps=6)
        _multi(tmp_path / "two", 2, 2, total_steps=3)
        two = _multi(tmp_path / "two", 2, 2, total_steps=6)
    one = single.result()
    assert (one["devices"], one["processes"]) == (4, 1)
    assert (two["devices"], two["processes"]) == (4, 2)
    assert len(two["losses"]) == 6
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    assert two["accuracy"] == one["accuracy"] and two["num_examples"] == one["num_examples"] == 360
    # Only process 0 wrote, and the checkpoints were written collectively.
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["3", "6"]
    assert (tmp_path / "two" / "model.npz").exists()


def test_every_process_stops_when_one_host_lacks_memory_for_the_step(tmp_path):
    # Process 1's host has no memory left for the CPU step (Linux would end it in the step, and
    # process 0 would wait for it there): both stop before the first step, each with one error.
    ends = _multi(tmp_path, 2, 1, env={"NO_MEMORY_LEFT_ON": "1"}, check=False, timeout=240)
    errors = [err.strip().splitlines()[-1] for _, err in ends]
    assert [rc for rc, _ in ends] == [1, 1], errors
    assert errors[0].startswith(
        "vit_jax.train.TrainingError: out of memory in the training step (process 1's host has too "
        "little memory left for the step): "
    ), errors
    assert errors[1].startswith(
        "vit_jax.train.TrainingError: out of memory in the training step (XLA's buffers for it "
        "need "
    ), errors
    assert (
        not os.path.exists(tmp_path / "metrics.jsonl")
        or not (tmp_path / "metrics.jsonl").read_text()
    )


def test_processes_prepare_a_tfds_dataset_one_after_another(tmp_path):
    # Two processes, one --tfds_data_dir (as on a pod with a shared bucket): process 0 downloads
    # and prepares CIFAR-10 while the other waits, then finds it ready and fetches nothing.
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from test_train import _fake_cifar10_archive

    archive = _fake_cifar10_archive(tmp_path / "extracted")
    log = tmp_path / "fetches.txt"
    env = {"FAKE_CIFAR10": str(archive), "FETCH_LOG": str(log)}
    result = _multi(
        tmp_path / "run", 2, 1, env=env, dataset="cifar10", tfds_data_dir=str(tmp_path / "tfds"),
        batch_eval=4, test_split="test", train_split="train",
    )  # fmt: skip
    assert log.read_text().split() == ["0"]
    assert result["processes"] == 2 and result["num_examples"] == 6


def test_fsdp_and_remat_change_nothing_and_compose_with_accumulation(tmp_path):
    base, levers = _singles(
        (tmp_path / "base", 4, dict(accum_steps=2, env={"JAX_LOG_COMPILES": "1"})),
        (tmp_path / "levers", 4, dict(accum_steps=2, shard_params=True, remat=True)),
    )
    np.testing.assert_allclose(levers["losses"], base["losses"], rtol=1e-5)
    assert levers["accuracy"] == base["accuracy"]
    # One process writes each replicated array whole: orbax's replica-parallel saving would compile
    # and run a slice per array shape and device (ViT-B/16 on 4 devices: a first save of 2.9-4.0 s, not 0.9).
    assert "Compiling jit(init_params)" in base["stderr"]  # (the log is on)
    assert "Compiling jit(slice)" not in base["stderr"]
    # The checkpoints of a 4-device run, replicated and FSDP-sharded, read back in this 1-device
    # process as host arrays equal to the run's final model.npz.
    for name in ("base", "levers"):
        saved = checkpoint.load_orbax_params(str(tmp_path / name))
        final = checkpoint.load(str(tmp_path / name / "model.npz"))
        assert jax.tree.structure(saved) == jax.tree.structure(final)
        jax.tree.map(np.testing.assert_array_equal, saved, final)
    # And a run resumes on another number of devices (4 -> 1 here): restored to the new placement.
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from test_train import tiny_config

    config = tiny_config(total_steps=7, eval_every=3, checkpoint_every=3, batch=16, batch_eval=16)
    config.model_overrides["dropout_rate"] = 0.1
    config.accum_steps = 2
    resumed = train.train_and_evaluate(config, str(tmp_path / "base"))
    assert resumed["step"] == 7 and resumed["num_examples"] == 360


def test_cpu_blocks_on_four_devices_change_nothing(tmp_path):
    # Without dropout (blocks draw their own masks), 2 micro-batches of 2 rows per device == the same
    # cut into blocks of 1 image (5 tokens): 4 micro-batches.
    no_dropout = dict(
        hidden_size=16, mlp_dim=32, num_heads=2, num_layers=1, patch_size=(4, 4), dropout_rate=0.0
    )
    base, blocks = _singles(
        (tmp_path / "base", 4, dict(accum_steps=2, model_overrides=no_dropout)),
        (
            tmp_path / "blocks",
            4,
            dict(accum_steps=2, cpu_block_tokens=5, model_overrides=no_dropout),
        ),
    )
    np.testing.assert_allclose(blocks["losses"], base["losses"], rtol=1e-5)
    assert blocks["accuracy"] == base["accuracy"]
    assert blocks["micro_batches"] == 4 and base["micro_batches"] == 2


def test_cpu_blocks_pick_the_fewest_blocks_under_the_token_budget():
    assert parallel.cpu_blocks(32, 197, 1024) == 8  # ViT-Ti/16 224 px, batch 32: 4 images a block
    assert parallel.cpu_blocks(8, 197, 1024) == 2
    assert parallel.cpu_blocks(6, 197, 1024) == 2  # 3 images, 591 tokens
    assert parallel.cpu_blocks(7, 197, 1024) == 7  # only 1 or 7 divide 7
    assert parallel.cpu_blocks(8, 577, 1024) == 8  # one image is already over: one at a time
    assert parallel.cpu_blocks(8, 577, 0) == 1  # off
    assert parallel.cpu_blocks(4, 10, 1024) == 1


def test_the_largest_cache_is_read_from_linux_listing(tmp_path):
    for index, size in enumerate(["48K", "64K", "2048K", "491520K"]):  # the Xeon's, as its VM lists
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    read = parallel.last_level_cache_bytes.__wrapped__
    assert read(str(tmp_path)) == 480 * 2**20
    (tmp_path / "index3" / "size").write_text("unreadable")
    (tmp_path / "index4").mkdir()
    (tmp_path / "index4" / "size").write_text("1M")
    assert read(str(tmp_path)) == 2 * 2**20  # the unreadable entry is skipped
    assert read(str(tmp_path / "missing")) is None  # no listing (macOS, Windows)


@pytest.mark.parametrize(
    "cache, train_tokens, tokens",
    [(32 * 2**20, 1024, 1024), (480 * 2**20, 1024, 4096), (64 * 2**20, 512, 2048),
     (None, 1024, 1024), (480 * 2**20, 0, 0)],
)  # fmt: skip
def test_inference_blocks_are_larger_on_a_cpu_with_a_large_cache(
    monkeypatch, cache, train_tokens, tokens
):
    monkeypatch.setattr(parallel, "last_level_cache_bytes", lambda: cache)
    assert parallel.inference_block_tokens(train_tokens) == tokens
    # Predictions take that default: 16 images of 197 tokens in blocks of 4 (1024) or 16 (4096).
    model = type("Model", (), {"num_tokens": lambda self, hw: 197})()
    blocks = []
    monkeypatch.setattr(parallel, "map_in_blocks", lambda fn, x, n, at_once: blocks.append(n))
    parallel.apply_in_blocks(model, {}, jnp.zeros((16, 224, 224, 3)))
    default = parallel.inference_block_tokens()
    assert blocks == [parallel.cpu_blocks(16, 197, default)]
    assert blocks == [{1024: 4, 4096: 1}[default]]


def test_blocks_interleave_rows_and_merge_rows_undoes_it():
    x = np.arange(12).reshape(6, 2)
    rows = parallel.strided_rows(jnp.asarray(x), 3)
    assert rows.shape == (2, 3, 2)
    for j in range(3):  # block j: rows j, j + 3
        np.testing.assert_array_equal(parallel.rows_block(rows, j), x[[j, j + 3]])
    blocks = jnp.stack([parallel.rows_block(rows, j) for j in range(3)])
    np.testing.assert_array_equal(parallel.merge_rows(blocks), x)
    # Each call of the function sees one block: subtracting the block's first row gives, for row
    # i, x[i] - x[i % 3].
    out = parallel.map_in_blocks(lambda b: {"y": b - b[0]}, jnp.asarray(x), 3)
    np.testing.assert_array_equal(out["y"], x - x[np.arange(6) % 3])


# (blocks, at once, the compiled loop's trips): 12 rows; a remainder is peeled off the loop.
@pytest.mark.parametrize(
    "blocks, at_once, trips", [(4, 1, [4]), (4, 2, [2]), (6, 4, []), (12, 5, [2])]
)
def test_map_in_blocks_computes_blocks_side_by_side(blocks, at_once, trips):
    x = np.arange(36, dtype=np.float32).reshape(12, 3)
    fn = jax.jit(lambda x: parallel.map_in_blocks(lambda b: {"y": b - b[0]}, x, blocks, at_once))
    np.testing.assert_array_equal(fn(x)["y"], x - x[np.arange(12) % blocks])
    text = fn.lower(x).compile().as_text()
    assert [int(n) for n in re.findall(r'known_trip_count":\{"n":"(\d+)"', text)] == trips
    assert parallel.blocks_at_once(blocks, at_once) == min(blocks, at_once)
    assert parallel.blocks_at_once(1, at_once) == 1


def test_bfloat16_training_stays_close_to_float32(tmp_path):
    f32, bf16 = _singles((tmp_path / "f32", 1, {}), (tmp_path / "bf16", 1, dict(dtype="bfloat16")))
    # Stated tolerance: per-step training loss within 2 % (relative) of float32 on this tiny run.
    np.testing.assert_allclose(bf16["losses"], f32["losses"], rtol=0.02)
    assert not np.array_equal(bf16["losses"], f32["losses"])


def test_fsdp_spec_splits_the_largest_divisible_dimension():
    assert parallel.fsdp_spec((768, 3072), 4) == parallel.P(None, "data")
    assert parallel.fsdp_spec((768, 12, 64), 8) == parallel.P("data", None, None)
    assert parallel.fsdp_spec((197, 768), 3) == parallel.P(None, "data")
    assert parallel.fsdp_spec((3072,), 4) == parallel.P()  # small: replicated
    assert parallel.fsdp_spec((4097, 4099), 2) == parallel.P()  # nothing divides
    assert parallel.fsdp_spec((768, 3072), 1) == parallel.P()


@pytest.mark.parametrize(
    "args,message",
    [
        (("127.0.0.1:1234", None, 0), "give all of --coordinator_address"),
        (("127.0.0.1:1234", 2, 2), "--process_id 2 must be in 0..1"),
    ],
)
def test_distributed_flag_errors(args, message):
    with pytest.raises(parallel.DistributedError, match=message):
        parallel.initialize(*args)


def test_single_process_needs_no_runtime(monkeypatch):
    for name in ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE",
                 "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    assert parallel.initialize() is False
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert parallel.initialize() is False
