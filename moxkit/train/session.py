"""One training run from start to finish: training arguments, the staged output, the Trainer
and its step log, the momentum ticks and the final extrapolation.

The output is built in a staged folder beside OUT (moxkit.atomic: locked, random name, so two
runs with the same OUT never touch each other's files) and published only when complete.
Scratch (the Trainer's folder, θ_mem snapshots for on-disk extrapolation) lives in a work
folder inside it, removed before publishing; an error, Ctrl-C or SIGTERM removes all of it.
Every process of a distributed run executes the same calls; state dicts are gathered
collectively (FSDP/DeepSpeed need that) and only the main process writes files.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import psutil
import torch
from accelerate import PartialState
from accelerate.utils import DistributedType

from moxkit.atomic import shielded, staged_dir
from moxkit.errors import InputError, ResourceError
from moxkit.hf import Loaded
from moxkit.text import pad_id

from .config import TrainConfig
from .data import Collator, PairDataset, PairSampler
from .models import ARGS_FILE, LOG_FILE, CheckpointNames, save_model
from .momentum import (
    AdapterExtrapolator,
    DiskExtrapolator,
    Extrapolator,
    InMemoryExtrapolator,
    MomentumCallback,
    reference_state,
)
from .objectives import LossSpec
from .precision import frozen_reference, reference_mode
from .trainer import MoxTrainer, StepLog, quiet_callbacks, training_arguments

WORK = ".moxkit-work"  # scratch inside the staged output, removed before it is published


class Run:
    """Use as a context manager; `publish()` puts the finished output in place."""

    def __init__(self, out, force: bool, config: TrainConfig, n_rows: int):
        self.config, self.force = config, force
        self.out = Path(out) if out is not None else None
        self.args = training_arguments(config, n_rows)  # sets up the process group
        self.is_main = self.args.process_index == 0
        self.staged: Path | None = None  # the folder being built (main process only)
        self.names: CheckpointNames | None = None  # MODEL's tensor names, for every save
        # --lora without --merge, writing an output: adapters are handed back, not full models
        self.adapter_output = bool(config.lora and not config.merge and out is not None)
        self.trainer: MoxTrainer | None = None
        self.log: StepLog | None = None
        self.result_path: Path | None = None
        self.reference_bf16 = False  # the reference's linear weights are bf16

    def __enter__(self) -> Run:
        self._stack = contextlib.ExitStack()
        try:
            if self.out is not None and self.is_main:
                self.staged = self._stack.enter_context(staged_dir(self.out, force=self.force))
                scratch = self.work / "trainer"
                scratch.mkdir(parents=True)
            else:
                scratch = Path(self._stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="moxkit-trainer-")))  # fmt: skip
            self.args.output_dir = str(scratch)
            self.barrier()
        except BaseException:
            # exit as failed: a plain close() would publish the half-built staged folder
            self._stack.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool | None:
        return self._stack.__exit__(exc_type, exc, tb)

    @property
    def work(self) -> Path:
        assert self.staged is not None
        return self.staged / WORK

    def barrier(self) -> None:
        PartialState().wait_for_everyone()

    def write_args(self, command: str, arguments: dict) -> None:
        if self.staged is not None:
            data = {"command": command, **arguments, "config": self.config.to_dict()}
            data["world_size"] = self.args.world_size
            text = json.dumps(data, indent=2, default=str) + "\n"
            (self.staged / ARGS_FILE).write_text(text, encoding="utf-8")

    def keep_names_of(self, ref: Loaded) -> None:
        """Save every output under MODEL's own tensor names (see moxkit.train.models)."""
        if ref.directory is not None:
            self.names = CheckpointNames(ref.directory, ref.model.base_model_prefix)

    # --- training ---

    def reference(self, ref: Loaded, start: Loaded, targeted: bool):
        """The frozen θ_ref the loss compares with (None with LoRA: the adapters disabled),
        held as config.reference says (moxkit.train.precision)."""
        if self.config.lora:
            return None
        mode = reference_mode(self.config.reference, bf16=bool(self.args.bf16),
                              separate_copy=start is ref, targeted=targeted)  # fmt: skip
        self.reference_bf16 = mode == "bf16"
        return frozen_reference(ref.model, ref.stored_dtype, mode, copy_it=start is ref)

    def train(self, start: Loaded, dataset: PairDataset, spec: LossSpec, reference, callbacks):
        model = start.model
        if self.config.lora:
            torch.manual_seed(self.config.seed)  # LoRA's A is random: same seed, same run
            model = _with_lora(model, self.config.lora)
        trainer = MoxTrainer(
            model=model,
            args=self.args,
            train_dataset=dataset,
            data_collator=Collator(pad_id(start.tokenizer)),
            spec=spec,
            sampler=PairSampler(len(dataset), len(dataset.retain), self.config.seed),
            reference=reference,
            reference_bf16=self.reference_bf16,
        )
        quiet_callbacks(trainer)
        log_path = self.staged / LOG_FILE if self.staged is not None else None
        self.trainer = trainer
        self.log = StepLog(trainer, log_path, self.config.progress)
        for cb in (self.log, *callbacks):
            trainer.add_callback(cb)
        trainer.train()
        if self.config.lora and not self.adapter_output:  # the base with the adapters merged
            merged = self.model.merge_and_unload()
            trainer.model = trainer.model_wrapped = merged
        return trainer

    @property
    def model(self):
        """The trained model, unwrapped from DDP and friends."""
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def _save_to(self, directory: Path | None, tokenizer) -> None:
        state = self.trainer.accelerator.get_state_dict(self.trainer.model_wrapped)  # collective
        if self.is_main:
            save_model(self.model, tokenizer, directory, state, self.names)

    def save_mem_scratch(self) -> Path | None:
        """θ_mem for the engine, replacing the previous tick's."""
        mem_dir = self.work / "mem" if self.is_main else None
        if self.is_main:
            shutil.rmtree(mem_dir, ignore_errors=True)
        self._save_to(mem_dir, None)
        return mem_dir

    def save_trained(self, tokenizer) -> None:
        """The trained model (fp32) is the output; with --lora, its adapter."""
        if self.adapter_output and self.is_main:
            self.model.save_pretrained(self.staged, safe_serialization=True)
            tokenizer.save_pretrained(self.staged)
        elif self.out is not None:
            self._save_to(self.staged, tokenizer)
        self.publish()

    def save_elsewhere(self, tokenizer, path: Path) -> None:
        """θ_mem next to the forget model (save_mem), staged and published like any output."""
        with contextlib.ExitStack() as stack:
            folder = None
            if self.is_main:
                folder = stack.enter_context(staged_dir(path, force=self.force))
            if self.adapter_output:  # θ_mem's adapter
                if self.is_main:
                    self.model.save_pretrained(folder, safe_serialization=True)
                    tokenizer.save_pretrained(folder)
            else:
                self._save_to(folder, tokenizer)
        self.barrier()

    def publish(self) -> None:
        """Drop the work folder and put the staged output in place (staged_dir's exit)."""
        if self.staged is not None:
            with shielded():
                shutil.rmtree(self.work, ignore_errors=True)
            self._stack.close()
            self.staged = None
        if self.out is not None:
            self.result_path = self.out
        self.barrier()

    # --- extrapolation ---

    def extrapolator(self, ref: Loaded, alpha: float, eta: float | None, where: str,
                     reference: torch.nn.Module | None = None) -> Extrapolator:  # fmt: skip
        """Forget adapters (--lora), in memory (θ_ref and θ_for as CPU fp32 tensors, main
        process only; θ_ref shared with the loss's frozen `reference` where it can be) or on
        disk."""
        work = self.work if self.is_main and self.staged is not None else None
        if self.adapter_output:
            return AdapterExtrapolator(ref.directory, alpha, eta, work)
        if self._where(ref, where) == "disk":
            return DiskExtrapolator(ref.directory, alpha, eta, work)
        state = reference_state(reference, ref.model) if self.is_main else {}
        return InMemoryExtrapolator(state, alpha, eta)

    def _where(self, ref: Loaded, where: str) -> str:
        possible = ref.directory is not None and self.out is not None
        if where == "auto":
            sharded = PartialState().distributed_type in (
                DistributedType.FSDP,
                DistributedType.DEEPSPEED,
            )
            fp32_bytes = 4 * sum(p.numel() for p in ref.model.parameters())
            too_big = 2 * fp32_bytes > psutil.virtual_memory().available // 2
            return "disk" if (sharded or too_big) and possible else "memory"
        if where == "disk" and not possible:
            raise InputError("extrapolate_on='disk': needs the model as a folder and an output",
                             params=("extrapolate_on",))  # fmt: skip
        return where

    def momentum_callback(self, extrapolator: Extrapolator, every: int) -> MomentumCallback:
        def tick(step: int) -> None:
            extrapolator.tick(self)
            self.barrier()
            self.log.event({"step": step, "event": "momentum", "tick": extrapolator.ticks})

        return MomentumCallback(every, tick)

    def finish_extrapolation(self, extrapolator: Extrapolator, tokenizer, dtype: torch.dtype):
        """The final tick, into the trained model in memory (returned, in MODEL's dtype; None
        on processes other than the main one) or through the engine on disk (None)."""
        model = extrapolator.finish(self, tokenizer, dtype)
        self.publish()
        return model

    def adopt(self, built: Path) -> None:
        """Move what an extrapolation built into the staged output; the run's own log and
        arguments win."""
        for item in built.iterdir():
            if not (self.staged / item.name).exists():
                item.rename(self.staged / item.name)


def _with_lora(model, rank: int):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ResourceError(
            "lora: needs PEFT: pip install 'moxkit[lora]'", params=("lora",)
        ) from None
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0)
    with warnings.catch_warnings():
        # PEFT reads transformers' deprecated `is_gradient_checkpointing`: a FutureWarning on
        # every --lora run that the user can do nothing about (and -q must keep quiet)
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        return get_peft_model(model, config)
