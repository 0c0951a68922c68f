"""The training loop: deterministic, resumable, data-parallel under torchrun.

    batches (seed, step) -> forward (CE + load balance + z-loss) -> backward -> all-reduce
    -> clip -> AdamW -> [validate] -> [checkpoint in model-directory format]
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trustmoe.config import ModelConfig, TrainConfig, get_preset, resolve_device
from trustmoe.data.shards import open_tokens
from trustmoe.data.tokenizer import eos_id, load_tokenizer
from trustmoe.io import TrustmoeError, sha256_file
from trustmoe.model.fast import optimize_for_training
from trustmoe.model.hf import load as load_model
from trustmoe.model.transformer import Transformer
from trustmoe.security.dp import DPSGD, DPConfig
from trustmoe.train import distributed as D
from trustmoe.train.batches import BatchSampler
from trustmoe.train.checkpoint import (
    METRICS_FILE,
    load_optimizer_tensors,
    read_model_metadata,
    read_train_state,
    save_checkpoint,
)
from trustmoe.train.optim import lr_at, make_optimizer, set_lr
from trustmoe.train.progress import TrainProgress

REFIT_AT = (3, 10, 30, 100)  # steps after which a time-budgeted run refits its schedule
RESERVE_CAP = 0.6  # `reserve_steps` never takes more than this share of the time budget


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    tokens: int
    seconds: float
    val_loss: float | None
    stopped: str  # "max_steps" | "time" | "stop_at"
    losses: list[float] = field(default_factory=list)  # training loss per step run here
    val_windows: int = 0  # validation: this many windows of val.bin ...
    val_window_tokens: int = 0  # ... each this many tokens long
    dp: dict[str, Any] | None = None  # DPState.to_dict() when trained with DP-SGD

    @property
    def val_perplexity(self) -> float | None:
        return math.exp(self.val_loss) if self.val_loss is not None else None

    @property
    def val_tokens(self) -> int:
        return self.val_windows * self.val_window_tokens

    def val_measured_on(self) -> str:
        """What `val_loss` is the mean cross-entropy of, in words (printed beside it)."""
        return validation_description(self.val_windows, self.val_window_tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def validation_description(windows: int, window_tokens: int) -> str:
    """Training's validation measurement in words: which tokens, and how much context."""
    return (f"{windows * window_tokens:,} tokens of val.bin: {windows} evenly spaced windows of "
            f"{window_tokens} tokens (each token sees up to {window_tokens - 1} before it)")


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.dtype == "bfloat16":
        return True
    if cfg.dtype == "float32":
        return False
    if cfg.dtype != "auto":
        raise TrustmoeError(f"unknown dtype {cfg.dtype!r}; use auto, float32 or bfloat16")
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_configs(
    data_dir: Path, preset: str, overrides: dict[str, Any] | None
) -> tuple[ModelConfig, TrainConfig]:
    p = get_preset(preset)
    tcfg = p.train
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if not hasattr(tcfg, k):
            raise TrustmoeError(f"unknown training option {k!r}")
        setattr(tcfg, k, v)
    for name in ("batch_size", "seq_len", "grad_accum", "max_steps"):
        if getattr(tcfg, name) <= 0:
            raise TrustmoeError(f"{name.replace('_', '-')} must be positive, got {getattr(tcfg, name)}")
    if not (0 < tcfg.lr < 1):
        raise TrustmoeError(f"learning rate {tcfg.lr} is outside (0, 1)")
    tok = load_tokenizer(data_dir / "tokenizer.json")
    eos = eos_id(tok)
    mcfg = p.model.replace(
        vocab_size=tok.get_vocab_size(), bos_token_id=eos, eos_token_id=eos,
        max_position_embeddings=max(p.model.max_position_embeddings, tcfg.seq_len),
    )
    return mcfg, tcfg


def train(
    data_dir: str | Path,
    out_dir: str | Path,
    preset: str = "small",
    *,
    max_steps: int | None = None,
    max_minutes: float | None = None,
    resume: bool = False,
    device: str | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    stop_at: int | None = None,
    reserve_steps: float = 0.0,
    dp: DPConfig | None = None,
) -> TrainResult:
    """Train `preset` on DATA_DIR and write a model directory to OUT_DIR.

    `max_steps` sets the schedule length; with only `max_minutes`, the step count is fitted to
    the time budget after timing the first steps. `stop_at` stops early (as an interruption
    would) after writing a checkpoint, without changing the schedule. `reserve_steps` keeps
    that many steps' worth of time (at the measured pace, at most 60% of the budget) out of
    `max_minutes`, for work that follows training (the demo evaluates); the pace adapts to how
    busy the machine is. `dp` trains with DP-SGD (`trustmoe.security.dp`): the schedule is then
    fixed in advance (the noise is calibrated to it), and the ε spent is recorded in
    `trustmoe.json` under "dp".
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if max_minutes is not None and max_minutes <= 0:
        raise TrustmoeError(f"--max-minutes must be positive, got {max_minutes}")
    if reserve_steps < 0:
        raise TrustmoeError(f"reserve_steps must be >= 0, got {reserve_steps}")
    dev = resolve_device(device)
    info = D.init_from_env(dev.type)
    if info.world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    mcfg, tcfg = resolve_configs(data_dir, preset, overrides)
    if max_steps is not None:
        tcfg.max_steps = max_steps
    auto_steps = max_steps is None and max_minutes is not None and dp is None
    if dp is not None:
        dp.validate()
        if info.world > 1:
            raise TrustmoeError("DP training runs in one process; drop torchrun for --dp-epsilon")
    step_cap = tcfg.max_steps  # the preset's schedule length bounds a time-fitted one
    train_tokens, val_tokens = open_tokens(data_dir, "train"), open_tokens(data_dir, "val")
    sampler = BatchSampler(train_tokens, tcfg.seq_len, tcfg.seed)
    val_sampler = BatchSampler(val_tokens, tcfg.seq_len, tcfg.seed)
    manifest = data_dir / "manifest.json"
    dataset_sha = sha256_file(manifest) if manifest.exists() else None

    start_step, tokens_seen = 0, 0
    torch.manual_seed(tcfg.seed)
    if resume:
        state, opt_tensors = read_train_state(out_dir)
        meta = read_model_metadata(out_dir)
        if meta.get("preset") != preset:
            raise TrustmoeError(
                f"cannot resume: {out_dir} was trained with preset {meta.get('preset')!r}, not {preset!r}"
            )
        model = load_model(out_dir, device=dev).train()
        start_step, tokens_seen = int(state["step"]), int(state["tokens"])
        tcfg.max_steps = int(state["max_steps"])
        auto_steps = False
    else:
        if (out_dir / "train_state.safetensors").exists():
            raise TrustmoeError(
                f"{out_dir} already holds a checkpoint; pass --resume to continue it or choose "
                "another --out (nothing was overwritten)"
            )
        model = Transformer(mcfg).to(dev).train()
    optimize_for_training(model)  # fused lm_head + cross-entropy; same numerics, same names
    dps = None if dp is None else DPSGD(
        model, train_tokens, tcfg.seq_len, tcfg.batch_size * tcfg.grad_accum, tcfg.max_steps, dp,
        tcfg.seed, **(_dp_resume(read_model_metadata(out_dir)) if resume else {}))
    opt = make_optimizer(model, tcfg, dev.type)
    if resume:
        load_optimizer_tensors(opt, opt_tensors)

    metrics_path = out_dir.with_name(f".{out_dir.name}.metrics.jsonl")
    if info.is_main:
        _prepare_metrics(metrics_path, out_dir / METRICS_FILE if resume else None, start_step)
    bf16 = use_bf16(tcfg, dev)
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
    val_batches = val_sampler.eval_batches(tcfg.eval_batches, tcfg.batch_size)
    val_windows = tcfg.eval_batches * tcfg.batch_size
    tokens_per_step = tcfg.batch_size * tcfg.seq_len * tcfg.grad_accum * info.world
    metadata_base = {
        "preset": preset, "dataset_manifest_sha256": dataset_sha, "data_dir": str(data_dir),
        "train_args": tcfg.to_dict(), "world_size": info.world, "device": dev.type, "bf16": bf16,
    }

    def evaluate() -> float:
        model.eval()
        total = 0.0
        with torch.no_grad(), autocast:
            for x, y in val_batches:
                total += float(model.run(x.to(dev), y.to(dev)).ce_loss)  # type: ignore[arg-type]
        model.train()
        return D.all_mean(total / len(val_batches), info, dev)

    def checkpoint(step: int, val_loss: float | None) -> None:
        if info.is_main:
            meta = dict(metadata_base, step=step, tokens=tokens_seen, max_steps=tcfg.max_steps,
                        metrics={"val_loss": val_loss,
                                 "val_perplexity": math.exp(val_loss) if val_loss else None,
                                 "val_tokens": val_windows * tcfg.seq_len,
                                 "val_measured_on": validation_description(val_windows,
                                                                           tcfg.seq_len)},
                        dp=dps.state.to_dict() if dps is not None else None)
            save_checkpoint(out_dir, model, opt, data_dir / "tokenizer.json", meta,
                            {"step": step, "tokens": tokens_seen, "max_steps": tcfg.max_steps},
                            metrics_path)
        D.barrier(info)

    t0 = time.perf_counter()
    budget = max_minutes * 60 if max_minutes is not None else math.inf
    val_loss: float | None = None
    losses: list[float] = []
    recent: list[float] = []  # seconds of the last steps: the pace for `reserve_steps`

    def reserve() -> float:
        """Seconds kept for after training; capped so a slow start cannot take it all."""
        return min(reserve_steps * pace(recent), RESERVE_CAP * budget)
    stopped = "max_steps"
    step = start_step
    bar = TrainProgress(tcfg.max_steps, start_step, enabled=progress and info.is_main,
                        provisional=auto_steps)
    with bar:
        while step < tcfg.max_steps:
            ts = time.perf_counter()
            set_lr(opt, lr := lr_at(step, tcfg, tcfg.max_steps))
            loss_sum, balance = 0.0, []
            for micro in range(tcfg.grad_accum if dps is None else 0):
                x, y = sampler.batch(step, micro, tcfg.batch_size, tcfg.grad_accum,
                                     info.rank, info.world)
                with autocast:
                    out = model.run(x.to(dev), y.to(dev), return_stats=True)
                assert out.loss is not None
                (out.loss / tcfg.grad_accum).backward()
                loss_sum += float(out.loss.detach())
                balance += [r.load_entropy for r in out.routing]
            if dps is not None:  # DP-SGD: per-sample clipping + noise replace the global clip
                res = dps.step(step)
                loss_sum, grad_norm = res.loss * tcfg.grad_accum, float("nan")
            else:
                D.average_gradients(model, info)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                                 tcfg.grad_clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            loss = D.all_mean(loss_sum / tcfg.grad_accum, info, dev)
            losses.append(loss)
            dt = time.perf_counter() - ts
            record: dict[str, Any] = {
                "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "tokens": tokens_seen, "tokens_per_s": tokens_per_step / dt,
                "load_balance": sum(balance) / len(balance) if balance else None,
                "ce_loss": (float(out.ce_loss.detach()) if dps is None and out.ce_loss is not None
                            else None),
            }
            recent = [*recent, dt][-20:]
            if dps is not None:
                record.update(dp_epsilon=dps.state.epsilon, dp_batch=res.batch_size,
                              dp_clipped=res.clipped_fraction, grad_norm=None)
            if auto_steps and step - start_step in REFIT_AT:
                # fit the schedule to the time budget; refit as timing settles (first steps
                # are slow), so a noisy start does not end training early
                per_step = (time.perf_counter() - t0) / (step - start_step)
                fitted = start_step + int((budget - reserve()) / per_step * 0.97)
                tcfg.max_steps = min(step_cap, max(step + 1, fitted))
                bar.set_total(tcfg.max_steps)
            last = step >= tcfg.max_steps
            out_of_time = time.perf_counter() - t0 + reserve() > budget
            interrupted = stop_at is not None and step >= stop_at
            if step % tcfg.eval_every == 0 or last or out_of_time or interrupted:
                val_loss = evaluate()
                record["val_loss"] = val_loss
            if info.is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.update(step, record)
            if step % tcfg.checkpoint_every == 0 or last or out_of_time or interrupted:
                checkpoint(step, val_loss)
            if out_of_time and not last:
                stopped = "time"
                break
            if interrupted and not last:
                stopped = "stop_at"
                break
    seconds = time.perf_counter() - t0
    if info.is_main:
        metrics_path.unlink(missing_ok=True)  # its copy lives in the checkpoint
    D.shutdown(info)
    return TrainResult(out_dir, step, tokens_seen, seconds, val_loss, stopped, losses,
                       val_windows, tcfg.seq_len, dps.state.to_dict() if dps is not None else None)


def pace(recent: list[float]) -> float:
    """Seconds per step: the median of the recent steps (a load spike on a shared machine
    moves it little), leaving the oldest out; 0 until three steps have run."""
    return float(statistics.median(recent[1:])) if len(recent) >= 3 else 0.0


def _prepare_metrics(staging: Path, previous: Path | None, start_step: int) -> None:
    """Start the metrics log; on resume keep only the lines up to the checkpoint's step."""
    staging.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    if previous is not None and previous.exists():
        for line in previous.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                if json.loads(line).get("step", 0) <= start_step:
                    lines.append(line)
    staging.write_text("".join(line + "\n" for line in lines))


def _dp_resume(meta: dict[str, Any]) -> dict[str, Any]:
    """Noise multiplier and steps of a DP checkpoint, so a resumed run keeps its accounting."""
    d = meta.get("dp")
    if not isinstance(d, dict):
        raise TrustmoeError("cannot resume with --dp-epsilon: the checkpoint was not trained with DP")
    return {"noise_multiplier": float(d["noise_multiplier"]), "steps_done": int(d["steps"])}
