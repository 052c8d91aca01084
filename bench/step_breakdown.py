"""Where our training step's time goes on this CPU, by kind of work, measured with torch.profiler.

    python bench/step_breakdown.py                       # 20 warm-up + 40 profiled steps, all cores
    python bench/step_breakdown.py --threads 1 --steps 20
    python bench/step_breakdown.py --precision no        # fp32 instead of bf16 autocast

It runs our own Trainer.fit, unchanged, on a stream of real CLINC150 batches: the default recipe of
config.py (mean pooling with the cosine head, layer-wise learning-rate decay, label smoothing,
frozen word embeddings, the EMA weight average, fused AdamW, length-grouped batches), batches of
--batch-size (32) texts of at most --max-length (64) tokens, bf16 autocast where the CPU has native
bf16 (--precision). The training set is a random sample of just enough rows of train.csv for
--warmup + --steps + 1 batches, trained for one epoch.

torch.profiler records CPU activity for --steps steps after --warmup unrecorded ones (the last
warm-up step is the profiler's own warm-up). A step runs from the start of one training forward to
the start of the next: forward, loss, backward, clipping, the optimizer step, zero_grad, the
learning-rate and EMA updates, and loading the next batch. For attribution the script labels
phases without changing what runs: the model's forward (module hooks), the loss (a Trainer
subclass whose loss() calls the original under a label) and torch.nn.utils.clip_grad_norm_
(wrapped for the duration); backward ops carry autograd's node names, the optimizer torch's own
"Optimizer.step#" / "Optimizer.zero_grad#" labels, the DataLoader its "enumerate(DataLoader)#"
label.

Each recorded op's *self* CPU time (its time minus that of the ops it calls) goes to one kind:

    host syncs       aten::item and aten::_local_scalar_dense, wherever they run
    data             the DataLoader's next batch (collation) and batch.to(device)
    clipping         everything inside clip_grad_norm_ (norms, _foreach_mul_)
    optimizer        everything inside the AdamW step and zero_grad (_fused_adamw_ or foreach ops)
    EMA              the weight average's _foreach_lerp_
    casts            bf16/fp32 conversions: ops under aten::to / aten::_to_copy (autocast's copies
                     of weights and inputs) and the ToCopyBackward0 nodes (gradients back to fp32)
    matmuls          the linear layers: forward ops under aten::linear / matmul / mm / addmm, and
                     the backward ops of the Addmm / Mm autograd nodes
    attention        scaled_dot_product_attention and all it runs, and in the backward the Bmm and
                     SafeSoftmax nodes of its math path (batched matmuls are attention's only here)
    norms & act.     layer_norm, gelu, dropout and their backward nodes
    other ops        the rest: embeddings, reshapes, residual adds, the mean pooling and cosine head,
                     the loss, gradient accumulation, running sums
    outside ops      the step's wall time not inside any recorded op: Python in the model's modules
                     and the training loop, and the profiler's own overhead

Casts aside, a forward op's kind is that of the outermost op under the forward label (the aten::mm
inside aten::linear is a matmul, the copy under its aten::to a cast), a backward op's that of its
autograd node. It prints the table (ms per step and share of the profiled wall time),
the same split by phase, the largest "other" ops, the achieved GFLOP/s of forward + backward on
real (unpadded) tokens (the FLOPs formula of compare_hf.py) and its fraction of this machine's
matmul peak (measured as in compare_hf.py, same threads), then all of it as one JSON line.

Run it on an otherwise idle machine: a competing process slows every op.
"""

import argparse
import contextlib
import json
import math
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from compare_hf import measure_matmul_peak, non_embedding_parameters, training_flops  # noqa: E402

from config import FullFinetuneConfig  # noqa: E402
from full_finetune import Split, Trainer  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "clinc150" / "train.csv"
FORWARD, LOSS, CLIP = "step_breakdown::forward", "step_breakdown::loss", "step_breakdown::clip_grad_norm_"
BACKWARD_NODE = "autograd::engine::evaluate_function: "
HOST_SYNCS = {"aten::item", "aten::_local_scalar_dense"}
CAST_OPS = {"aten::to", "aten::_to_copy"}
KINDS = ("matmuls", "attention", "norms & activations", "casts", "optimizer", "EMA", "clipping", "data",
         "host syncs", "other ops", "outside ops")
PHASES = ("forward", "loss", "backward", "clipping", "optimizer", "EMA", "data", "other", "outside ops")
MATMUL = re.compile(r"^(linear|matmul|mm|addmm|addbmm|einsum)(backward\d*)?$")
# Batched matmuls are attention's (scores and weighted values) in these encoders: SDPA's math path
# leaves BmmBackward0 and SafeSoftmaxBackward0 nodes in the backward.
ATTENTION = re.compile(r"scaleddotproduct|flashattention|efficientattention|^softmax|^safesoftmax|^bmm|^baddbmm")
NORM_ACTIVATION = re.compile(r"layernorm|gelu|dropout|tanh|relu|silu")


# --------------------------------------------------------------------------------------------
# Classifying the profiled ops
# --------------------------------------------------------------------------------------------

def op_kind(name):
    """matmuls, attention, norms & activations or other ops, from an op or autograd node name
    ("aten::addmm", "AddmmBackward0", "SafeSoftmaxBackward0")."""
    key = name.split("::")[-1].lower().replace("_", "")
    if MATMUL.match(key):
        return "matmuls"
    if ATTENTION.search(key):
        return "attention"
    if NORM_ACTIVATION.search(key):
        return "norms & activations"
    return "other ops"


def ancestors(event):
    """The event's chain of enclosing events, outermost first, the event itself last, without the
    profiler's own ProfilerStep annotations."""
    chain = []
    while event is not None:
        if not event.name.startswith("ProfilerStep"):
            chain.append(event)
        event = event.cpu_parent
    return chain[::-1]


def phase_and_kind(event):
    """(phase, kind) of one profiled event; the module docstring gives the rules."""
    if event.name.startswith("ProfilerStep"):  # its self time is the step's time outside any op
        return "outside ops", "outside ops"
    chain = ancestors(event)
    names = [e.name for e in chain]
    casts = any(name in CAST_OPS for name in names)
    for i, name in enumerate(names):
        if name in (FORWARD, LOSS):
            phase = "forward" if name == FORWARD else "loss"
            if i + 1 == len(names):  # the label's own self time: Python in the modules
                kind = "outside ops"
            elif casts:
                kind = "casts"
            else:  # the outermost op under the label says what this op is part of
                kind = op_kind(names[i + 1]) if phase == "forward" else "other ops"
            break
        if name.startswith(BACKWARD_NODE):
            node = name[len(BACKWARD_NODE):]
            phase, kind = "backward", "casts" if casts or node.startswith("ToCopyBackward") else op_kind(node)
            break
        if name == CLIP:
            phase, kind = "clipping", "clipping"
            break
        if name.startswith(("Optimizer.step#", "Optimizer.zero_grad#")):
            phase, kind = "optimizer", "optimizer"
            break
        if name.startswith("enumerate(DataLoader)"):
            phase, kind = "data", "data"
            break
    else:
        top = chain[0]
        if top.name == "aten::_foreach_lerp_":
            phase, kind = "EMA", "EMA"
        elif top.name == "aten::to" and not top.cpu_children:  # a batch tensor already on its device
            phase, kind = "data", "data"
        elif top.name in ("aten::_foreach_norm", "aten::_foreach_mul_"):  # clip_grad_norm_ called unwrapped
            phase, kind = "clipping", "clipping"
        else:
            phase, kind = "other", "casts" if casts else "other ops"
    if event.name in HOST_SYNCS:
        kind = "host syncs"
    return phase, kind


# --------------------------------------------------------------------------------------------
# Running and profiling our Trainer
# --------------------------------------------------------------------------------------------

class LabelledTrainer(Trainer):
    """Our Trainer, its loss computed under a profiler label (Trainer.loss is meant to be overridden)."""

    def loss(self, logits, labels):
        with record_function(LOSS):
            return super().loss(logits, labels)


@contextlib.contextmanager
def labelled_clipping():
    """torch.nn.utils.clip_grad_norm_ under a profiler label, for as long as the block runs."""
    original = torch.nn.utils.clip_grad_norm_

    def clip_grad_norm_(*args, **kwargs):
        with record_function(CLIP):
            return original(*args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = clip_grad_norm_
    try:
        yield
    finally:
        torch.nn.utils.clip_grad_norm_ = original


def build_trainer(args, frame):
    label_names = sorted(set(frame["intent"]))
    index = {name: i for i, name in enumerate(label_names)}
    rows = (args.warmup + args.steps + 1) * args.batch_size  # one more batch closes the last profiled step
    if rows > len(frame):
        sys.exit(f"--warmup + --steps + 1 batches need {rows} rows; {args.data} has {len(frame)}")
    sample = frame.sample(n=rows, random_state=args.seed)
    config = FullFinetuneConfig()  # the default recipe
    config.MAX_LENGTH = args.max_length
    config.BATCH_SIZE = args.batch_size
    config.EPOCHS = 1
    config.MIXED_PRECISION = args.precision
    config.EARLY_STOPPING_PATIENCE = None
    config.SAVE_EVERY_STEPS = None
    config.DEVICE = "cpu"
    config.SEED = args.seed
    with contextlib.redirect_stdout(sys.stderr):
        trainer = LabelledTrainer(config, label_names, progress=False)
    split = Split(sample["text"].tolist(), [index[name] for name in sample["intent"]])
    train = trainer.dataset(split)
    val = trainer.dataset(Split(split.texts[:64], split.labels[:64]))  # fit needs one; not measured
    return trainer, train, val


def profile_fit(args, trainer, train, val):
    """fit() under the profiler; returns the recorded events, each forward's start time and the
    real / padded token counts of the profiled steps."""
    warmup, steps = args.warmup, args.steps
    state = {"forwards": 0, "starts": [], "lengths": [], "padded": 0, "label": None, "events": None}

    def on_trace_ready(prof):
        state["events"] = prof.events()

    prof = profile(activities=[ProfilerActivity.CPU],
                   schedule=schedule(wait=warmup, warmup=1, active=steps, repeat=1),
                   on_trace_ready=on_trace_ready)

    def before_forward(module, args_, kwargs):
        if not module.training:  # validation at the end of fit
            return
        # Profiler step k (from 0) is the window up to the k-th training forward: the steps are
        # set apart at the start of each forward, and steps warmup + 1 .. warmup + steps are recorded.
        state["forwards"] += 1
        state["starts"].append(time.perf_counter())
        prof.step()
        if warmup + 1 <= state["forwards"] <= warmup + steps:
            mask = kwargs.get("attention_mask")
            if mask is not None:
                state["lengths"] += mask.sum(1).tolist()
                state["padded"] += mask.numel()
        state["label"] = record_function(FORWARD)
        state["label"].__enter__()

    def after_forward(module, args_, kwargs, output):
        if state["label"] is not None:
            state["label"].__exit__(None, None, None)
            state["label"] = None

    hooks = [trainer.model.register_forward_pre_hook(before_forward, with_kwargs=True),
             trainer.model.register_forward_hook(after_forward, with_kwargs=True)]
    output_dir = tempfile.TemporaryDirectory(prefix="step_breakdown_")  # fit's end-of-epoch checkpoint
    trainer.config.OUTPUT_DIR = output_dir.name
    try:
        with prof, labelled_clipping(), contextlib.redirect_stdout(sys.stderr):
            trainer.fit(train, val)
    finally:
        for hook in hooks:
            hook.remove()
        output_dir.cleanup()
    if state["events"] is None or state["forwards"] < warmup + steps + 1:
        sys.exit(f"only {state['forwards']} training steps ran; the profile is incomplete")
    return state


def summarise(args, trainer, state, peak):
    steps, warmup = args.steps, args.warmup
    starts = state["starts"]
    wall_us = 1e6 * (starts[warmup + steps] - starts[warmup])  # forwards warmup + 1 .. warmup + steps + 1
    by_kind, by_phase, other_ops = defaultdict(float), defaultdict(float), defaultdict(float)
    traced = 0.0
    for event in state["events"]:
        self_us = event.self_cpu_time_total
        phase, kind = phase_and_kind(event)
        by_kind[kind] += self_us
        by_phase[phase] += self_us
        traced += self_us
        if kind == "other ops":
            other_ops[event.name] += self_us
    outside = wall_us - traced
    by_kind["outside ops"] += outside
    by_phase["outside ops"] += outside

    def per_step(us):
        return us / 1000 / steps

    fwd_bwd_us = by_phase["forward"] + by_phase["loss"] + by_phase["backward"]
    flops, tokens = training_flops(state["lengths"], trainer.model.base_model.config,
                                   non_embedding_parameters(trainer.model), 1)
    peak_flops = peak.get(f"peak_{trainer.precision}_flops")
    achieved = flops / (fwd_bwd_us / 1e6)
    # The unprofiled wall time per step: the second half of the warm-up, before the profiler's warm-up step.
    first = max(1, math.ceil(warmup / 2))
    unprofiled = [b - a for a, b in zip(starts[first:warmup - 1], starts[first + 1:warmup], strict=True)]
    return {
        "precision": trainer.precision, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "max_length": args.max_length, "warmup_steps": warmup, "profiled_steps": steps,
        "ms_per_step_profiled": per_step(wall_us),
        "ms_per_step_unprofiled": 1000 * sum(unprofiled) / len(unprofiled) if unprofiled else None,
        "by_kind_ms": {kind: per_step(by_kind[kind]) for kind in KINDS},
        "by_kind_share": {kind: by_kind[kind] / wall_us for kind in KINDS},
        "by_phase_ms": {phase: per_step(by_phase[phase]) for phase in PHASES},
        "top_other_ops_ms": {name: per_step(us) for name, us in
                             sorted(other_ops.items(), key=lambda item: -item[1])[:8]},
        "real_tokens_per_step": tokens / steps, "padded_tokens_per_step": state["padded"] / steps,
        "fwd_bwd_flops_per_step": flops / steps, "fwd_bwd_ms_per_step": per_step(fwd_bwd_us),
        "fwd_bwd_gflops_per_s": achieved / 1e9,
        "step_gflops_per_s": flops / (wall_us / 1e6) / 1e9,
        "peak_fp32_gflops_per_s": peak["peak_fp32_flops"] / 1e9,
        "peak_bf16_gflops_per_s": peak["peak_bf16_flops"] / 1e9,
        "fwd_bwd_mfu": achieved / peak_flops if peak_flops else None,
        "fwd_bwd_mfu_vs_bf16_peak": achieved / peak["peak_bf16_flops"],
    }


def print_tables(summary):
    step = summary["ms_per_step_profiled"]
    print(f"Our training step: {summary['profiled_steps']} profiled steps after {summary['warmup_steps']} warm-up, "
          f"{summary['precision']}, {summary['threads']} thread(s), batch {summary['batch_size']}, "
          f"max length {summary['max_length']}")
    print(f"\n{'kind':<22}{'ms/step':>10}{'share':>9}")
    for kind in KINDS:
        print(f"{kind:<22}{summary['by_kind_ms'][kind]:>10.1f}{100 * summary['by_kind_share'][kind]:>8.1f}%")
    print(f"{'step (profiled wall)':<22}{step:>10.1f}{100.0:>8.1f}%")
    if summary["ms_per_step_unprofiled"] is not None:
        print(f"{'step without profiler':<22}{summary['ms_per_step_unprofiled']:>10.1f}"
              "   (late warm-up steps: other batches)")
    print(f"\n{'phase':<22}{'ms/step':>10}{'share':>9}")
    for phase, ms in summary["by_phase_ms"].items():
        print(f"{phase:<22}{ms:>10.1f}{100 * ms / step:>8.1f}%")
    print("\nlargest ops in 'other ops' (self time, ms/step): "
          + ", ".join(f"{name} {ms:.1f}" for name, ms in summary["top_other_ops_ms"].items()))
    print(f"\nforward + backward: {summary['fwd_bwd_ms_per_step']:.1f} ms/step for "
          f"{summary['real_tokens_per_step']:.0f} real tokens ({summary['padded_tokens_per_step']:.0f} with padding), "
          f"{summary['fwd_bwd_flops_per_step'] / 1e9:.1f} GFLOP -> {summary['fwd_bwd_gflops_per_s']:.1f} GFLOP/s "
          f"(whole step: {summary['step_gflops_per_s']:.1f} GFLOP/s)")
    mfu = summary["fwd_bwd_mfu"]
    print(f"matmul peak on these threads: bf16 {summary['peak_bf16_gflops_per_s']:.0f} GFLOP/s, "
          f"fp32 {summary['peak_fp32_gflops_per_s']:.0f} GFLOP/s; forward + backward reach "
          f"{100 * summary['fwd_bwd_mfu_vs_bf16_peak']:.1f}% of the bf16 peak"
          + (f" ({100 * mfu:.1f}% of the {summary['precision']} peak)" if mfu is not None
             and summary["precision"] != "bf16" else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help="training CSV with columns text, intent (default: CLINC150's train.csv)")
    parser.add_argument("--warmup", type=int, default=20,
                        help="unrecorded steps first, at least 1 (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=40, help="profiled steps (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "no"),
                        help="MIXED_PRECISION: auto is bf16 autocast on a CPU with native bf16, "
                             "no is fp32 (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    parser.add_argument("--max-length", type=int, default=64, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=42, help="the sample of rows and SEED (default: %(default)s)")
    parser.add_argument("--peak-repeats", type=int, default=10,
                        help="timed 2048x2048 matmuls per precision for the peak (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    frame = pd.read_csv(args.data, dtype={"text": str, "intent": str})
    trainer, train, val = build_trainer(args, frame)
    state = profile_fit(args, trainer, train, val)
    peak = measure_matmul_peak(args.peak_repeats)
    summary = summarise(args, trainer, state, peak)
    print_tables(summary)
    print(json.dumps({key: round(value, 4) if isinstance(value, float) else
                      {k: round(v, 4) for k, v in value.items()} if isinstance(value, dict) else value
                      for key, value in summary.items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
