"""Time one optimizer step of MoLA (with and without shared-input groups, without dropout, with activation
checkpointing) vs PEFT LoRA vs the per-expert loop, against the frozen base's own floor.

    python benchmarks/bench_step.py                 # SmolLM2-135M, batch 16x128, 2 threads, 3 rounds
    python benchmarks/bench_step.py --model tiny-llama --repeats 2   # smoke run
    python benchmarks/bench_step.py --device cuda --model llama2-7b-shape --shape 2468 --budget 160
                                                    # random LLaMA-2-7B-shaped base, the paper's allocation

Each variant trains the same frozen base (bf16 on CPUs with AVX512-BF16) with
fp32 adapters on the same random batch; the loss is the answer-token loss the
trainer uses (LM head on the last 2 positions). The floor is the base alone,
forward and backward to the input embeddings: what any adapter method pays.
The variants run interleaved, `--rounds` times (`--repeats` timed steps after a
warm-up step each), so a busy machine slows them alike; we report the median
step (wall and the process's CPU time: on a machine that other jobs load, the CPU time is the steadier
measure, since waiting for a core does not count), its ratio to the floor, and each variant's peak resident
memory (the process's high-water mark, reset before each variant via /proc/self/clear_refs). `--profile N`
adds one profiled floor and MoLA step and the N operators that add the most self CPU time over the floor; `--flops`
counts one step's FLOPs of the floor, PEFT LoRA and MoLA: the time ratio MoLA could reach if its thin matmuls ran
as fast per FLOP as the base's.
`--baseline REV` adds "mola@REV": the same model and weights through `mola_search/mola/layer.py` as of git
revision REV (its layer methods, shared-input groups, dropout pool and balance loss) and PyTorch's default AdamW
(the other variants use the trainer's, fused), for before/after in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_mola import reference_forward  # noqa: E402  (the readable per-expert loop)

from mola_search.allocation import resolve_allocation  # noqa: E402
from mola_search.mola import DEFAULT_TARGETS, MoLAConfig, MoLALinear, MoLAModel  # noqa: E402
from mola_search.models import (LLAMA2_7B_SHAPE, decoder_layers, load_base_model, parse_device,  # noqa: E402
                                random_llama, resolve_dtype)
from mola_search.train.batching import model_device, tail_logits, to_device  # noqa: E402
from mola_search.train.trainer import adamw, answer_loss  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model: torch.nn.Module, batch: dict[str, torch.Tensor], repeats: int,
               opt: torch.optim.Optimizer | None = None) -> list[tuple[float, float]]:
    """`repeats` timed optimizer steps after one warm-up step: (wall seconds, process CPU seconds) of each."""
    params = [p for p in model.parameters() if p.requires_grad]
    if params and opt is None:
        opt = adamw(params, lr=1e-6)
    aux_fn = getattr(model, "auxiliary_loss", None)
    model.train()
    device = model_device(model)
    batch = to_device(batch, device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    times = []
    for i in range(repeats + 1):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast:
            logits = tail_logits(model, batch, 2)
        loss = answer_loss(logits, batch["labels"][:, -2:])
        aux = aux_fn() if aux_fn else None
        (loss + aux if aux is not None else loss).backward()
        if opt is not None:  # the floor has nothing to train
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        if i:  # first step warms up allocator and kernels
            times.append((time.perf_counter() - t0, time.process_time() - c0))
    return times


def profile_step(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                 opt: torch.optim.Optimizer | None = None) -> dict[str, float]:
    """Self CPU milliseconds per operator of one optimizer step (after a warm-up step), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    time_steps(model, batch, 0, opt)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        time_steps(model, batch, 0, opt)
    return {event.key: event.self_cpu_time_total / 1e3 for event in prof.key_averages()}


def _addmm_flops(_self, mat1, mat2, *_args, out_shape=None, **_kwargs) -> int:
    """FLOPs of addmm_ (its arguments' shapes, as torch's FLOP counter passes them)."""
    return 2 * mat1[0] * mat1[1] * mat2[1]


def step_flops(model: torch.nn.Module, batch: dict[str, torch.Tensor],
               opt: torch.optim.Optimizer | None = None) -> int:
    """Floating-point operations of one training step (forward and backward; the optimizer's elementwise update
    is not counted), from torch's FLOP counter: matmuls and attention, which is what the floor's time is made of."""
    from torch.utils.flop_counter import FlopCounterMode

    # torch's counter knows addmm but not the in-place addmm_ that MoLA accumulates its outputs and gradients with
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_flops})
    with counter:
        time_steps(model, batch, 0, opt)
    return counter.get_total_flops()


def where_mola_spends(floor_ms: dict[str, float], mola_ms: dict[str, float], top: int) -> dict[str, object]:
    """MoLA's profiled step against the floor's: the operators that add the most self CPU time."""
    extra = {op: mola_ms.get(op, 0.0) - floor_ms.get(op, 0.0) for op in set(floor_ms) | set(mola_ms)}
    total_extra = sum(mola_ms.values()) - sum(floor_ms.values())
    ranked = sorted(extra.items(), key=lambda kv: -kv[1])[:top]
    return {"floor_total_ms": sum(floor_ms.values()), "mola_total_ms": sum(mola_ms.values()),
            "extra_ms": total_extra,
            "top": [{"op": op, "extra_ms": ms, "share": ms / total_extra} for op, ms in ranked],
            "floor_ms": floor_ms, "mola_ms": mola_ms}


def _configure(mola: MoLAModel, variant: str, dropout: float) -> None:
    """The shared MoLA model set up as `variant`: groups off for "mola-ungrouped", dropout 0 for "mola-no-dropout"."""
    mola.state.fuse_groups = variant != "mola-ungrouped"
    for layer in mola.mola_layers.values():
        layer.dropout_p = 0.0 if variant == "mola-no-dropout" else dropout


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def baseline_layer(rev: str) -> ModuleType:
    """`mola_search/mola/layer.py` as of git revision `rev`, imported as a module of its own."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "-C", str(root), "show", f"{rev}:mola_search/mola/layer.py"],
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "layer.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"mola_layer_at_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def using_layer(module: ModuleType, mola: MoLAModel, groups: dict[int, object]):
    """`mola` (the same weights) running another revision's layer code: its `MoLALinear` methods, the shared-input
    `groups` built from its `InputGroup` (by id of the current group), its dropout pool and balance loss."""
    import mola_search.mola.model as model_module

    methods = {k: v for k, v in vars(module.MoLALinear).items() if callable(v) and not k.startswith("__")}
    saved = {k: MoLALinear.__dict__.get(k) for k in methods}
    layers = list(mola.mola_layers.values())
    own_groups = [layer.group for layer in layers]
    pool, loss = mola.state.dropout, model_module.balance_loss
    try:
        for k, v in methods.items():
            setattr(MoLALinear, k, v)
        for layer, group in zip(layers, own_groups):
            layer.group = None if group is None else groups[id(group)]
        if hasattr(module, "DropoutPool"):
            mola.state.dropout = groups.setdefault("pool", module.DropoutPool(pool.width))
        model_module.balance_loss = module.balance_loss
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                delattr(MoLALinear, k)
            else:
                setattr(MoLALinear, k, v)
        for layer, group in zip(layers, own_groups):
            layer.group = group
        mola.state.dropout, model_module.balance_loss = pool, loss


class Floor(torch.nn.Module):
    """The frozen base alone, with gradients flowing back to its input embeddings: no adapter at all."""

    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        self.base = base
        base.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))

    def forward(self, **kwargs):
        return self.base(**kwargs)


def _ratios(results: dict[str, dict[str, float]], key: str) -> dict[str, float]:
    """MoLA against the floor and PEFT LoRA, and each MoLA variant against MoLA, by `key` (step_s or cpu_s)."""
    mola = results["mola"][key]
    ratios = {"mola_over_floor": mola / results["floor"][key],
              "lora_over_floor": results["peft-lora"][key] / results["floor"][key],
              "mola_over_lora": mola / results["peft-lora"][key]}
    for name, label in (("mola-ungrouped", "ungrouped"), ("mola-no-dropout", "no_dropout"),
                        ("mola-checkpointed", "checkpointed"), ("mola-loop", "loop")):
        if name in results:
            ratios[f"{label}_over_mola"] = results[name][key] / mola
    for name in results:
        if name.startswith("mola@"):
            ratios[f"{name}_over_mola"] = results[name][key] / mola
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct; llama2-7b-shape = "
                                                  "a random model with LLaMA-2-7B's shapes")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--shape", help="MoLA allocation (shape name or digits, e.g. 2468) instead of --experts per layer")
    ap.add_argument("--budget", type=int, help="expert budget for --shape (default 5 x layers)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--experts", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all variants")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-loop", action="store_true")
    ap.add_argument("--skip-ungrouped", action="store_true",
                    help="leave out MoLA with q/k/v and gate/up computing their input-side matmuls separately")
    ap.add_argument("--skip-no-dropout", action="store_true",
                    help="leave out MoLA with lora_dropout 0 (what dropout costs; LoRA keeps its 0.05)")
    ap.add_argument("--skip-checkpointed", action="store_true",
                    help="leave out MoLA with activation checkpointing (each decoder layer recomputed in backward)")
    ap.add_argument("--flops", action="store_true",
                    help="also count one step's FLOPs of the floor, PEFT LoRA and MoLA (torch's FLOP counter)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also profile one floor and one MoLA step (torch.profiler) and list the N operators that "
                         "add the most time over the floor")
    ap.add_argument("--baseline", metavar="REV",
                    help="also time MoLA through mola_search/mola/layer.py as of this git revision (\"mola@REV\")")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    batch_ids = torch.randint(100, 20000, (args.batch, args.seq))
    batch = {"input_ids": batch_ids, "attention_mask": torch.ones_like(batch_ids),
             "position_ids": torch.arange(args.seq).expand(args.batch, -1),
             "labels": torch.full_like(batch_ids, -100)}
    batch["labels"][:, -1] = batch_ids[:, -1]
    tokens = args.batch * args.seq
    device = parse_device(args.device)

    def base_model() -> torch.nn.Module:
        if args.model == "llama2-7b-shape":
            return random_llama(LLAMA2_7B_SHAPE, device=device, dtype=resolve_dtype(args.dtype, device))
        return load_base_model(args.model, dtype=args.dtype, device=str(device))[0]

    floor = Floor(base_model())
    layers = len(decoder_layers(floor.base))
    lora = get_peft_model(base_model(), LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05,
                                                   target_modules=list(DEFAULT_TARGETS)))
    if args.shape:
        spec = resolve_allocation(args.shape, layers, args.budget or 5 * layers, top_k=args.top_k, rank=args.rank)
        config = MoLAConfig.from_spec(spec, lora_alpha=2.0 * args.rank)
    else:
        config = MoLAConfig(experts=(args.experts,) * layers, top_k=(args.top_k,) * layers,
                            rank=(args.rank,) * layers, lora_alpha=2.0 * args.rank)
    mola = MoLAModel(base_model(), config)
    variants: dict[str, torch.nn.Module] = {"floor": floor, "peft-lora": lora, "mola": mola}
    if not args.skip_ungrouped:
        variants["mola-ungrouped"] = mola  # the same weights, every linear computing its own input-side matmuls
    if not args.skip_no_dropout:
        variants["mola-no-dropout"] = mola  # the same weights, every adapted linear with dropout 0
    if not args.skip_checkpointed:
        variants["mola-checkpointed"] = mola  # the same weights, decoder layers recomputed in backward
    if not args.skip_loop:
        variants["mola-loop"] = mola  # the same weights, through the per-expert loop (patched in below)
    baseline, baseline_groups = None, {}
    if args.baseline:
        baseline = baseline_layer(args.baseline)
        for layer in mola.mola_layers.values():
            if layer.group is not None and id(layer.group) not in baseline_groups:
                baseline_groups[id(layer.group)] = baseline.InputGroup(layer.group.members)
        variants[f"mola@{args.baseline}"] = mola  # the same weights, through the baseline revision's layer code
    # the trainer's AdamW (fused where it can be); the baseline revision's trainer used PyTorch's default
    optimizers = {name: (torch.optim.AdamW if name.startswith("mola@") else adamw)(
        [p for p in m.parameters() if p.requires_grad], lr=1e-6) for name, m in variants.items() if name != "floor"}

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    peaks: dict[str, float] = {name: 0.0 for name in variants}
    can_reset = _reset_peak_rss()
    original = MoLALinear.forward
    for _ in range(args.rounds):
        for name, model in variants.items():
            if name == "mola-loop":
                MoLALinear.forward = lambda self, x: reference_forward(self, x)
            _configure(mola, name, config.lora_dropout)
            if name == "mola-checkpointed":
                mola.activation_checkpointing_enable()
            at_baseline = (using_layer(baseline, mola, baseline_groups) if name == f"mola@{args.baseline}"
                           else contextlib.nullcontext())
            try:
                _reset_peak_rss()
                with at_baseline:
                    times[name] += time_steps(model, batch, args.repeats, optimizers.get(name))
                peaks[name] = max(peaks[name], _peak_rss_mb())
            finally:
                MoLALinear.forward = original
                if name == "mola-checkpointed":
                    mola.activation_checkpointing_disable()
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) / 2**20)
                torch.cuda.reset_peak_memory_stats(device)

    floor_s = statistics.median(wall for wall, _ in times["floor"])
    floor_cpu = statistics.median(cpu for _, cpu in times["floor"])
    results: dict[str, dict[str, float]] = {}
    memory = "peak_gpu_memory_mb" if device.type == "cuda" else "peak_rss_mb"
    for name, model in variants.items():
        med = statistics.median(wall for wall, _ in times[name])
        cpu = statistics.median(c for _, c in times[name])
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if name != "floor" else 0
        results[name] = {"step_s": med, "x_floor": med / floor_s, "cpu_s": cpu, "x_floor_cpu": cpu / floor_cpu,
                         "tokens_per_s": tokens / med, "trainable_params": trainable, memory: peaks[name],
                         "steps": [wall for wall, _ in times[name]], "steps_cpu": [c for _, c in times[name]]}
        print(f"{name:<17} step {med:6.3f} s  x{med / floor_s:5.2f} floor  cpu {cpu:6.3f} s  x{cpu / floor_cpu:5.2f}  "
              f"{tokens / med:9.1f} tok/s  {memory.replace('_mb', '')} {peaks[name]:7.0f} MB  trainable {trainable:,}",
              flush=True)
    ratios, ratios_cpu = _ratios(results, "step_s"), _ratios(results, "cpu_s")
    print(" ".join(f"{k}={v:.2f}" for k, v in ratios.items())
          + ("" if can_reset or device.type == "cuda" else " (peak RSS could not be reset: process-wide peaks)"))
    print("CPU time: " + " ".join(f"{k}={v:.2f}" for k, v in ratios_cpu.items()))
    flops = None
    if args.flops:
        _configure(mola, "mola", config.lora_dropout)
        flops = {name: step_flops(variants[name], batch, optimizers.get(name))
                 for name in ("floor", "peft-lora", "mola")}
        print("arithmetic (torch's FLOP counter, one step): " + "  ".join(
            f"{name} {n / 1e9:.1f} GFLOP x{n / flops['floor']:.3f}" for name, n in flops.items())
            + "  (a variant's time ratio over its FLOP ratio is what it loses to thin matmuls and other work)")
    profiled = None
    if args.profile:
        _configure(mola, "mola", config.lora_dropout)  # MoLA as the table's row has it
        profiled = where_mola_spends(profile_step(floor, batch), profile_step(mola, batch, optimizers["mola"]),
                                     args.profile)
        print(f"profiled step (self CPU, inflated by the profiler): floor {profiled['floor_total_ms']:.0f} ms, MoLA "
              f"{profiled['mola_total_ms']:.0f} ms, {profiled['extra_ms']:.0f} ms more; the operators adding most:")
        for row in profiled["top"]:
            print(f"  {row['op']:<58} +{row['extra_ms']:7.1f} ms  {100 * row['share']:5.1f} %")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": str(device), "layers": layers,
                                               "allocation": list(config.experts), "threads": args.threads,
                                               "dtype": str(next(floor.base.parameters()).dtype),
                                               "results": results, "ratios": ratios, "ratios_cpu": ratios_cpu,
                                               "profile": profiled, "flops": flops},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
