"""The Colab notebook runs top to bottom on CPU, offline, in a small configuration."""

import json
import os

import jax
import jax.numpy as jnp
import nbformat
from nbclient import NotebookClient

from vit_jax import checkpoint, models

NOTEBOOK = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colab", "vit_jax.ipynb"
)


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].metadata.get("tags") == ["parameters"]
    assert all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_runs_offline_end_to_end(tmp_path):
    # A published-layout checkpoint: a tiny 1000-class model whose head prefers ImageNet class 207.
    model = models.get_model("testing", num_classes=1000)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    params["head"]["bias"] = jnp.zeros(1000).at[207].set(8.0)
    ckpt = checkpoint.save(params, str(tmp_path / "testing.npz"))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells[1].source = "\n".join(
        [
            'MODEL = "testing"',
            f"CHECKPOINT = {ckpt!r}",
            f"FINETUNE_FROM = {ckpt!r}",
            'DATASET = "digits"',
            "STEPS = 8",
            "BATCH = 16",
            "IMAGE_SIZE = 32",
            "ACCUM_STEPS = 0",
            'TEST_SPLIT = ""',
            'IMAGES = ""',
            "MODEL_OVERRIDES = {}",
            "OFFLINE = True",
            'WORKDIR = "run"',
            'REPO = ""',
        ]
    )
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()

    text = "".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "stream"
    )
    result = json.loads(text.split("NOTEBOOK_RESULT", 1)[1].strip().splitlines()[0])
    assert result["top1"] == "golden retriever"
    assert result["rollout_shape"] == [2, 2]
    assert result["num_examples"] == 360 and 0.0 <= result["accuracy"] <= 1.0
    assert result["logged_steps"] == [2, 4, 6, 8]
    assert "1000 classes at 32x32 pixels" in text
    assert os.path.exists(tmp_path / "run" / "model.npz")


def test_a_cpu_gets_a_run_that_ends_in_minutes(tmp_path):
    # The committed parameters, the runtime cell and the fine-tuning cell, with the training call
    # replaced by one that prints the configuration it gets (the real one would download CIFAR-10).
    nb = nbformat.read(NOTEBOOK, as_version=4)
    finetune = next(c for c in nb.cells if "train.train_and_evaluate(" in c.source)
    stub = nbformat.v4.new_code_cell(
        "from vit_jax import train\n"
        "train.train_and_evaluate = lambda c, w: print('CONFIG', c.model, c.image_size, c.batch, "
        "c.accum_steps, c.total_steps, c.test_split, c.eval_every)"
    )
    nb.cells = [*nb.cells[:4], stub, finetune]
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "ViT-B_32 at 224 px, 64 images a step, 50 steps" in text
    assert "CONFIG ViT-B_32 224 64 1 50 test[:1000] 12" in text
