"""Where one training step of our Trainer goes on this CPU: forward, backward, clipping, AdamW and
zero_grad, timed separately on length-grouped CLINC150 batches of 32 with the packaged MiniLM, bf16
autocast and fused AdamW (our defaults), and with one change at a time:

    eager       transformers' eager attention instead of SDPA (same maths)
    ema         plus the EMA_DECAY update of the weight average after every step
    no_dropout  dropout probabilities set to 0 (changes training: for the breakdown only)
    frozen_emb  word embeddings frozen: no dense 11.7M-row gradient, half the optimizer work
                (changes training: for the breakdown only)

    python bench/step_breakdown.py                      # every variant, 30 warm-up + 60 timed steps
    python bench/step_breakdown.py --variants base eager

Run it on an otherwise idle machine: a competing process slows both cores' work many times over.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import FullFinetuneConfig  # noqa: E402
from full_finetune import (  # noqa: E402
    BuyerIntentDataset,
    PadToLongest,
    ShuffledBatches,
    build_optimizer,
    load_model_and_tokenizer,
)

VARIANTS = ("base", "eager", "ema", "no_dropout", "frozen_emb")
PHASES = ("forward", "backward", "clip", "adamw", "zero_grad", "ema")


def measure(variant, frame, warmup, steps):
    labels = sorted(frame["intent"].unique())
    ids = {label: i for i, label in enumerate(labels)}
    torch.manual_seed(0)
    model, tokenizer, _ = load_model_and_tokenizer("sentence-transformers/all-MiniLM-L6-v2", labels)
    if variant == "eager":
        model.set_attn_implementation("eager")
    if variant == "no_dropout":
        for module in model.modules():  # attention reads its Dropout module's p as well
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if variant == "frozen_emb":
        model.get_input_embeddings().weight.requires_grad_(False)
    dataset = BuyerIntentDataset(frame["text"].tolist(), [ids[x] for x in frame["intent"]], tokenizer, 64)
    sampler = ShuffledBatches(dataset.lengths, 32, seed=42)
    sampler.set_epoch(1)
    collate = PadToLongest(tokenizer.pad_token_id)
    batches = [collate([dataset[i] for i in rows]) for rows in list(sampler)[:warmup + steps]]
    optimizer = build_optimizer(model, FullFinetuneConfig(), torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    average = [p.detach().clone() for p in params] if variant == "ema" else None
    model.train()
    totals = dict.fromkeys(PHASES, 0.0)
    for step, batch in enumerate(batches):
        if step == warmup:
            totals = dict.fromkeys(PHASES, 0.0)
        target = batch.pop("labels")
        marks = [time.perf_counter()]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(**batch).logits
        loss = F.cross_entropy(logits.float(), target)
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        marks.append(time.perf_counter())
        optimizer.step()
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        if average is not None:  # as Trainer._optimizer_step does with EMA_DECAY
            with torch.no_grad():
                torch._foreach_lerp_(average, params, 0.001)
        marks.append(time.perf_counter())
        for phase, start, end in zip(PHASES, marks[:-1], marks[1:], strict=True):
            totals[phase] += end - start
    per_step = {phase: round(1000 * seconds / steps, 1) for phase, seconds in totals.items()}
    step_ms = sum(per_step.values())
    return {"variant": variant, "ms_per_step": round(step_ms, 1), **{f"{k}_ms": v for k, v in per_step.items()},
            "samples_per_s": round(32 * 1000 / step_ms, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "clinc150" / "train.csv"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    frame = pd.read_csv(args.data)
    for variant in args.variants:
        print(json.dumps(measure(variant, frame, args.warmup, args.steps)), flush=True)


if __name__ == "__main__":
    main()
