"""train-mem under FSDP: two processes (gloo on CPU, NCCL on a machine with two GPUs) launched
as `accelerate launch --use_fsdp` would (ACCELERATE_USE_FSDP and FSDP_* in the environment),
against one process with the same global batch.

accelerate decides whether FSDP is used. Version 1.16 enables it only for accelerator device
types (MULTI_GPU, MULTI_XPU, ...; accelerate/state.py): on CPU it runs the processes as plain
data-parallel (MULTI_CPU) and ignores the FSDP variables, so on a CPU-only machine this test
skips saying so; benchmarks/gpu_check.sh runs it where two GPUs exist."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moxkit.apps.tiny import build_tiny_llama, build_word_tokenizer, save_tiny_model, tiny_facts

WORKER = """
import json, sys
from accelerate import PartialState
from transformers import TrainerCallback
from moxkit.train import TrainConfig, train_mem

class Probe(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        from torch.distributed.tensor import DTensor
        p = next(model.parameters())
        self.seen = {"type": PartialState().distributed_type.value,
                     "sharded": isinstance(p, DTensor) and p.to_local().numel() < p.numel()}

probe = Probe()
out, probe_file = sys.argv[1], sys.argv[2]
config = TrainConfig(max_steps=2, batch_size=4, lr=1e-3, warmup_epochs=0, bf16=False,
                     progress=False)
train_mem(sys.argv[3], sys.argv[4], sys.argv[5], out, config=config, callbacks=[probe])
if PartialState().is_main_process:
    open(probe_file, "w").write(json.dumps(probe.seen))
"""
FSDP_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
}


@pytest.mark.slow
def test_fsdp_two_processes_match_one(tmp_path):
    if torch.cuda.is_available() and torch.cuda.device_count() == 1:
        pytest.skip(
            "one GPU: FSDP over two processes needs two GPUs (NCCL allows one rank per GPU)"
        )
    facts = tiny_facts(8)
    tok = build_word_tokenizer([f"{r['question']} {r['answer']}" for r in facts])
    model = build_tiny_llama(len(tok), hidden_size=32, num_heads=2, intermediate_size=64)
    ref = save_tiny_model(model, tok, tmp_path / "ref")
    files = []
    for name, part in (("forget", facts[:4]), ("retain", facts[4:])):
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in part))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, **FSDP_ENV, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get(
               "PYTHONPATH")]))}  # fmt: skip
    args = [str(ref), *map(str, files)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                "2", str(worker)]  # fmt: skip
    proc = subprocess.run([*launcher, str(tmp_path / "two"), str(tmp_path / "probe.json"), *args],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads((tmp_path / "probe.json").read_text())
    if seen["type"] != "FSDP":
        import accelerate

        pytest.skip(f"accelerate {accelerate.__version__} ran the FSDP launch as {seen['type']} "
                    "(it enables FSDP only on accelerator devices): FSDP is not exercised on "
                    "CPU; see benchmarks/gpu_check.sh")  # fmt: skip
    assert seen["sharded"]  # parameters are DTensor shards during training
    one_env = {k: v for k, v in env.items() if k not in FSDP_ENV}
    subprocess.run([sys.executable, str(worker), str(tmp_path / "one"), str(tmp_path / "p1"),
                    *args], env=one_env, check=True, capture_output=True, timeout=300)  # fmt: skip
    one, two = (load_file(tmp_path / k / "model.safetensors") for k in ("one", "two"))
    assert one.keys() == two.keys()
    atol = 1e-3 if torch.cuda.is_available() else 1e-5
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=atol)
