"""One training run from start to finish: training arguments, the atomic output directory,
the Trainer and its step log, the momentum ticks and the final extrapolation.

Every process of a distributed run executes the same calls; state dicts are gathered
collectively (FSDP/DeepSpeed need that) and only the main process writes files.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import psutil
import torch
from accelerate import PartialState
from accelerate.utils import DistributedType

from moxkit.errors import MoxError
from moxkit.hf import Loaded
from moxkit.text import pad_id

from .config import TrainConfig
from .data import Collator, PairDataset, PairSampler
from .models import ARGS_FILE, LOG_FILE, OutputDir, save_model
from .momentum import DiskExtrapolator, InMemoryExtrapolator, MomentumCallback, cpu_fp32_state
from .objectives import LossSpec
from .trainer import MoxTrainer, StepLog, quiet_callbacks, training_arguments


class Run:
    """Use as a context manager: on any error the partial output is removed."""

    def __init__(self, out, force: bool, config: TrainConfig, n_rows: int):
        config.validate()
        self.config = config
        self._scratch = tempfile.TemporaryDirectory(prefix="moxkit-trainer-")
        self.args = training_arguments(config, n_rows, Path(self._scratch.name))
        self.is_main = self.args.process_index == 0
        self.output = OutputDir(Path(out), force, self.is_main) if out is not None else None
        self.trainer: MoxTrainer | None = None
        self.log: StepLog | None = None
        self.result_path: Path | None = None

    def __enter__(self) -> Run:
        try:
            if self.output is not None:
                self.output.check()
                self.output.start()
                self.barrier()
        except BaseException:
            self._scratch.cleanup()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.output is not None:
            self.output.abort()
        self._scratch.cleanup()

    def barrier(self) -> None:
        PartialState().wait_for_everyone()

    def write_args(self, command: str, arguments: dict) -> None:
        if self.output is not None:
            data = {"command": command, **arguments, "config": self.config.to_dict()}
            data["world_size"] = self.args.world_size
            self.output.write_json(ARGS_FILE, data)

    # --- training ---

    def train(self, start: Loaded, dataset: PairDataset, spec: LossSpec, reference, callbacks):
        model = start.model
        if self.config.lora:
            model = _with_lora(model, self.config.lora)
        trainer = MoxTrainer(
            model=model,
            args=self.args,
            train_dataset=dataset,
            data_collator=Collator(pad_id(start.tokenizer)),
            spec=spec,
            sampler=PairSampler(len(dataset), len(dataset.retain), self.config.seed),
            reference=reference,
        )
        quiet_callbacks(trainer)
        log_path = self.output.partial / LOG_FILE if self.output is not None else None
        self.trainer = trainer
        self.log = StepLog(trainer, log_path, self.config.progress)
        for cb in (self.log, *callbacks):
            trainer.add_callback(cb)
        trainer.train()
        if self.config.lora:  # θ_mem is the base with the adapters merged in
            merged = self.model.merge_and_unload()
            trainer.model = trainer.model_wrapped = merged
        return trainer

    @property
    def model(self):
        """The trained model, unwrapped from DDP and friends."""
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def _state_dict(self):
        return self.trainer.accelerator.get_state_dict(self.trainer.model_wrapped)

    def _save_to(self, directory: Path, tokenizer) -> None:
        state = self._state_dict()  # collective under FSDP / DeepSpeed
        if self.is_main:
            save_model(self.model, tokenizer, directory, state)

    def _save_mem_scratch(self) -> Path:
        """θ_mem for the engine, replacing the previous tick's."""
        mem_dir = self.output.work / "mem"
        if self.is_main:
            shutil.rmtree(mem_dir, ignore_errors=True)
        self._save_to(mem_dir, None)
        return mem_dir

    def save_trained(self, tokenizer) -> None:
        """The trained model (fp32) is the output."""
        if self.output is not None:
            self._save_to(self.output.partial, tokenizer)
            self.commit()

    def save_elsewhere(self, tokenizer, path: Path, force: bool) -> None:
        """θ_mem next to the forget model (--save-mem), atomically like any output."""
        other = OutputDir(path, force, self.is_main)
        other.check()
        other.start()
        self.barrier()
        self._save_to(other.partial, tokenizer)
        other.commit()
        self.barrier()

    def commit(self) -> None:
        if self.output is not None:
            self.output.commit()
            self.result_path = self.output.out
        self.barrier()

    # --- extrapolation ---

    def extrapolator(self, ref: Loaded, alpha: float, eta: float | None, where: str):
        """In memory (θ_ref and θ_for as CPU fp32 copies, main process only) or on disk."""
        if self._where(ref, where) == "disk":
            return DiskExtrapolator(ref.directory, alpha, eta, self.output.work)
        state = cpu_fp32_state(ref.model.named_parameters()) if self.is_main else {}
        return InMemoryExtrapolator(state, alpha, eta)

    def _where(self, ref: Loaded, where: str) -> str:
        if where not in ("auto", "memory", "disk"):
            raise MoxError(f"--extrapolate-on {where!r}: expected auto, memory or disk")
        possible = ref.directory is not None and self.output is not None
        if where == "auto":
            sharded = PartialState().distributed_type in (
                DistributedType.FSDP,
                DistributedType.DEEPSPEED,
            )
            fp32_bytes = 4 * sum(p.numel() for p in ref.model.parameters())
            too_big = 2 * fp32_bytes > psutil.virtual_memory().available // 2
            return "disk" if (sharded or too_big) and possible else "memory"
        if where == "disk" and not possible:
            raise MoxError("--extrapolate-on disk: needs MODEL as a directory and an output")
        return where

    def momentum_callback(self, extrapolator, every: int) -> MomentumCallback:
        def tick(step: int) -> None:
            if isinstance(extrapolator, DiskExtrapolator):
                mem_dir = self._save_mem_scratch()
                if self.is_main:
                    extrapolator.update(mem_dir)
            elif self.is_main:
                extrapolator.update(self.model.named_parameters())
            self.barrier()
            self.log.event({"step": step, "event": "momentum", "tick": extrapolator.ticks})

        return MomentumCallback(every, tick)

    def finish_extrapolation(self, extrapolator, tokenizer, dtype: torch.dtype):
        """The final tick, into the trained model in memory (returned, in MODEL's dtype; None
        on processes other than the main one) or through the engine on disk (None)."""
        if isinstance(extrapolator, DiskExtrapolator):
            mem_dir, built = self._save_mem_scratch(), self.output.work / "forget"
            if self.is_main:
                extrapolator.update(mem_dir, out=built, final=True)
                self.output.commit(built)
            self.barrier()
            self.result_path = self.output.out
            return None
        if not self.is_main:
            self.barrier()
            return None
        model = self.model
        extrapolator.update(model.named_parameters())
        extrapolator.load_into(model)
        model.to(dtype)
        if self.output is not None:
            save_model(model, tokenizer, self.output.partial)
        self.commit()
        return model


def _with_lora(model, rank: int):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise MoxError("--lora needs PEFT: pip install 'moxkit[lora]'") from None
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0)
    return get_peft_model(model, config)
