"""`trustmoe train`, `trustmoe generate` and `trustmoe quantize`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from trustmoe.config import EngineConfig
from trustmoe.io import TrustmoeError

console = Console()
_ENGINE = EngineConfig()  # engine option defaults and help come from this one place


def train_cmd(
    data: Annotated[Path, typer.Option("--data", help="Dataset dir (tokenizer.json, train.bin, val.bin).")],
    out: Annotated[Path, typer.Option("--out", help="Model dir to write (Hugging Face layout).")],
    preset: Annotated[str, typer.Option(help="Model preset: tiny, small, small-dense, bench-small, ...")] = "small",
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (sets the LR schedule).")] = None,
    max_minutes: Annotated[
        float | None,
        typer.Option(help="Wall-clock budget; with no --max-steps the schedule is fitted to it."),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the checkpoint in --out exactly.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int | None, typer.Option(help="Sequences per micro-batch per process.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per sequence.")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warm-up steps.")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Validate every N steps.")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for init and batches.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto (bf16 autocast on CUDA), float32, bfloat16.")] = None,
    dp_epsilon: Annotated[float | None, typer.Option(
        "--dp-epsilon", help="Train with DP-SGD to this (ε, δ) budget over the whole schedule "
        "(per-sample clipping + Gaussian noise; Opacus RDP accountant).")] = None,
    dp_delta: Annotated[float, typer.Option("--dp-delta", help="DP δ (below 1/training windows).")] = 1e-5,
    max_grad_norm: Annotated[float, typer.Option(
        "--max-grad-norm", help="DP: per-sample gradient clipping bound C.")] = 1.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Train a MoE (or dense) model on a dataset directory.

    Writes checkpoints (complete model directories) to --out, appends metrics to
    --out/metrics.jsonl, and can be resumed exactly with --resume. For data parallelism run
    `torchrun --nproc_per_node=N -m trustmoe.train --data ... --out ...`.
    With --dp-epsilon the run is differentially private per training window; the ε spent is
    recorded in --out/trustmoe.json under "dp".
    """
    from trustmoe.security.dp import DPConfig
    from trustmoe.train import train

    dp = None if dp_epsilon is None else DPConfig(dp_epsilon, dp_delta, max_grad_norm).validate()

    overrides = dict(batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, lr=lr,
                     warmup_steps=warmup_steps, eval_every=eval_every,
                     checkpoint_every=checkpoint_every, seed=seed, dtype=dtype)
    if max_steps is not None and max_steps <= 0:
        raise TrustmoeError(f"--max-steps must be positive, got {max_steps}")
    res = train(data, out, preset, max_steps=max_steps, max_minutes=max_minutes, resume=resume,
                device=device, overrides=overrides, progress=not quiet and not json_out, dp=dp)
    summary = {
        "out_dir": str(res.out_dir), "steps": res.steps, "tokens": res.tokens,
        "seconds": round(res.seconds, 2), "tokens_per_s": round(res.tokens_per_second, 1),
        "val_loss": res.val_loss, "val_perplexity": res.val_perplexity,
        "val_tokens": res.val_tokens, "val_measured_on": res.val_measured_on(),
        "stopped": res.stopped,
    }
    if res.dp is not None:
        summary["dp_epsilon"], summary["dp_delta"] = res.dp["epsilon"], res.dp["delta"]
    if json_out:
        print(json.dumps(summary))
    else:
        ppl = f"{res.val_perplexity:.2f}" if res.val_perplexity else "-"
        loss = f"{res.val_loss:.4f}" if res.val_loss is not None else "-"
        console.print(f"[green]trained[/] {res.steps} steps -> {res.out_dir}\n"
                      f"validation loss {loss}, perplexity {ppl} on {res.val_measured_on()}",
                      highlight=False)
        if res.dp is not None:
            console.print(f"DP-SGD: ε = {res.dp['epsilon']:.3f} at δ = {res.dp['delta']:g} "
                          f"(σ = {res.dp['noise_multiplier']:.3f}, C = {res.dp['max_grad_norm']:g})")


def generate_cmd(
    model_dir: Annotated[Path, typer.Argument(
        help="Model directory (ours or any HF Mixtral/Llama, or a quantized artifact).")],
    prompt: Annotated[str, typer.Argument(help="Prompt text (the model's BOS is put in front).")],
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most (EOS stops earlier).")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens (0 = off).")] = 0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed: the same seed gives the same "
                                             "text here, from Python and from `trustmoe serve`.")] = None,
    stop: Annotated[list[str] | None, typer.Option(
        "--stop", help="Stop string (repeatable; not included in the text).")] = None,
    quantize: Annotated[str | None, typer.Option(help="int8 or int4 weights, as `trustmoe serve --quantize`.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON with ids and text.")] = False,
) -> None:
    """Generate a continuation of PROMPT with the serving engine (its sampler and seed rule)."""
    from trustmoe.generation import generate_text

    if max_tokens <= 0 or max_tokens > 1_000_000:
        raise TrustmoeError(f"--max-tokens must be between 1 and 1000000, got {max_tokens}")
    if temperature < 0:
        raise TrustmoeError(f"--temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise TrustmoeError(f"--top-p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise TrustmoeError(f"--top-k must be >= 0, got {top_k}")
    if quantize not in (None, "int8", "int4"):
        raise TrustmoeError(f"--quantize must be int8 or int4, got {quantize}")
    res = generate_text(model_dir, prompt, max_tokens=max_tokens, temperature=temperature,
                        top_p=top_p, seed=seed, device=device, top_k=top_k, quantize=quantize,
                        stop=stop or None)
    if json_out:
        print(json.dumps(res))
    else:
        console.print(prompt + res["text"], highlight=False, markup=False)


def quantize_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Model directory to quantize.")],
    out: Annotated[Path, typer.Argument(help="Directory for the quantized artifact.")],
    method: Annotated[str, typer.Option(help="int8 (per output channel) or int4 (group-wise).")] = "int8",
    group_size: Annotated[int, typer.Option(help=EngineConfig.help("group_size"))] = _ENGINE.group_size,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Save weight-only quantized weights as their own safetensors artifact.

    The artifact (model.quant.safetensors + quantization.json, with the source's SHA-256) loads
    with `trustmoe serve OUT` or `trustmoe.engine.Engine(OUT)`.
    """
    # the engine's own rules for these settings (one clear error, exit 2)
    config = EngineConfig(quantize=method, group_size=group_size, device="cpu")
    from trustmoe.engine.artifact import quantize_model_dir

    if not (model_dir / "config.json").exists():
        raise TrustmoeError(f"{model_dir} is not a model directory (no config.json)")
    res = quantize_model_dir(model_dir, out, method=str(config.quantize), group_size=config.group_size)
    if json_out:
        print(json.dumps(res))
    else:
        console.print(f"[green]quantized[/] {method}: {res['bytes']:,} bytes -> {res['path']}")


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
    app.command("generate")(generate_cmd)
    app.command("quantize")(quantize_cmd)
    from trustmoe.cli.demo import demo_cmd

    app.command("demo")(demo_cmd)
