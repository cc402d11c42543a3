"""Train the shipped demo speech model: a tiny wav2vec2 CTC model, from scratch, on CPU.

Why: quantization layer selection is driven by WER, so the project needs a real
(if small) speech model that works offline. The architecture is wav2vec2-base
in miniature (GroupNorm conv front end, post-LN transformer), so the plugin's
code paths are those of the real models.

    python -m recipes.data.train_demo --train DIR/index.tsv --dev DEV/index.tsv \
        --out MODEL_DIR --minutes 80 --seed 0

The LR schedule follows the elapsed fraction of the wall-clock budget, so the run
ends on time on a shared CPU. Every --eval-every minutes it logs dev WER/CER and
atomically re-saves MODEL_DIR, so a killed run still leaves a usable model.

Intermediate CTC (--inter-ctc, training only, shared lm_head) is on by default: without
it this post-LN model collapsed (every frame identical, all-blank output, vanishing
gradients) within ~1k steps at lr 2e-3; with it the loss leaves the ~3.0 plateau in
~300 steps. Use --threads 1 when other jobs share the CPU (2 threads stalled badly).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import jiwer
import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from transformers import (
    HubertConfig,
    HubertForCTC,
    Wav2Vec2Config,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    Wav2Vec2Processor,
)

VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|"] + [chr(c) for c in range(65, 91)] + ["'"]
CHAR2ID = {c: i for i, c in enumerate(VOCAB)}
SR = 16000
INTER_LAYERS = (0, 2)  # encoder input (after pos-conv + LN) and after layer 2


def make_config(arch: str = "wav2vec2"):
    """wav2vec2-base in miniature; ``hubert``: the same sizes in HuBERT-large's layout
    (LayerNorm conv front end with bias, pre-LN Transformer), a second family for transfer checks."""
    if arch == "hubert":
        return HubertConfig(**{**_shape(), "conv_bias": True, "feat_extract_norm": "layer",
                               "do_stable_layer_norm": True})
    return Wav2Vec2Config(**_shape())


def _shape() -> dict:
    return dict(
        vocab_size=len(VOCAB), pad_token_id=0, bos_token_id=1, eos_token_id=2,
        conv_dim=(128,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_bias=False, feat_extract_norm="group", feat_extract_activation="gelu",
        hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=768,
        num_conv_pos_embeddings=64, num_conv_pos_embedding_groups=16, do_stable_layer_norm=False,
        hidden_dropout=0.05, attention_dropout=0.05, activation_dropout=0.05, feat_proj_dropout=0.05,
        final_dropout=0.05, layerdrop=0.0, mask_time_prob=0.05, mask_time_length=5,
        mask_feature_prob=0.0, ctc_loss_reduction="mean", ctc_zero_infinity=True)


MODEL_CLASSES = {"wav2vec2": Wav2Vec2ForCTC, "hubert": HubertForCTC}


def make_processor(tmp: Path) -> Wav2Vec2Processor:
    """Character tokenizer + wav2vec2-base style feature extractor (normalise, no mask)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "vocab.json").write_text(json.dumps(CHAR2ID))
    tok = Wav2Vec2CTCTokenizer(str(tmp / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                               bos_token="<s>", eos_token="</s>", word_delimiter_token="|")
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SR, padding_value=0.0,
                                  do_normalize=True, return_attention_mask=False)
    return Wav2Vec2Processor(feature_extractor=fe, tokenizer=tok)


def normalize(x: np.ndarray) -> np.ndarray:
    """Exactly Wav2Vec2FeatureExtractor's zero_mean_unit_var_norm for one utterance."""
    return (x - x.mean()) / np.sqrt(x.var() + 1e-7)


def load_set(index: Path, limit: int | None = None):
    rows = [l.split("\t") for l in index.read_text().splitlines() if l.strip()][:limit]
    out = []
    for rel, text in rows:
        x, sr = sf.read(str(index.parent / rel), dtype="float32")
        assert sr == SR, (rel, sr)
        out.append((normalize(x).astype(np.float32), text.strip()))
    return out


def encode(text: str) -> list[int]:
    return [CHAR2ID.get(c, CHAR2ID["<unk>"]) for c in text.replace(" ", "|")]


def greedy_decode(logits: torch.Tensor) -> str:
    """Greedy CTC: argmax, collapse repeats, drop blanks, '|' -> space."""
    ids = torch.unique_consecutive(logits.argmax(-1)).tolist()
    chars = "".join(VOCAB[i] for i in ids if i > 4 or i == CHAR2ID["|"])
    return " ".join(chars.replace("|", " ").split())


@torch.no_grad()
def transcribe(model, audio: list[np.ndarray]) -> list[str]:
    """One utterance at a time, unpadded: what a user of the shipped model does."""
    model.eval()
    return [greedy_decode(model(torch.from_numpy(x)[None]).logits[0]) for x in audio]


def wer_cer(refs, hyps) -> tuple[float, float]:
    return jiwer.wer(refs, hyps), jiwer.cer(refs, hyps)


def batches(lengths: list[int], max_samples: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches of at most max_samples padded audio samples."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i] * rng.uniform(0.9, 1.1))
    out, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * max(lengths[j] for j in cur + [i]) > max_samples:
            out.append(cur)
            cur = []
        cur.append(i)
    out.append(cur)
    rng.shuffle(out)
    return out


def save(model, processor, out: Path, meta: dict) -> None:
    """Write to a sibling tmp dir, then swap it in: never a half-written model dir."""
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    processor.feature_extractor.save_pretrained(tmp)  # preprocessor_config.json, as wav2vec2-base
    (tmp / "training_state.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; the defaults are the settings the shipped demo model was trained with."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--dev", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", choices=sorted(MODEL_CLASSES), default="wav2vec2")
    ap.add_argument("--lr", type=float, default=1e-3)  # 2e-3 also trains with --inter-ctc
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--batch-seconds", type=float, default=16)
    ap.add_argument("--eval-every", type=float, default=5, help="minutes")
    ap.add_argument("--dev-subset", type=int, default=150)
    ap.add_argument("--log", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=None, help="use only N training utts (smoke)")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads; 1 is faster when other jobs share the CPU")
    ap.add_argument("--inter-ctc", type=float, default=0.4,
                    help="weight of intermediate CTC losses (0 disables)")
    ap.add_argument("--init", type=Path, default=None,
                    help="continue from a saved model dir (fresh optimizer and schedule)")
    return ap.parse_args(argv)


def make_log(path: Path | None) -> Callable[[str], None]:
    """A log function: timestamped (UTC) lines to stdout and, flushed line by line so a killed
    run keeps its history, appended to ``path`` when given."""
    logf = open(path, "a") if path else None

    def log(msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} {msg}"
        print(line, flush=True)
        if logf:
            logf.write(line + "\n")
            logf.flush()

    return log


def scheduled_lr(base_lr: float, warmup: int, step: int, frac: float) -> float:
    """Linear warmup over ``warmup`` steps, then a cosine over the elapsed fraction of the
    wall-clock budget (not of a step count), so the run ends on time on a shared CPU."""
    return base_lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * frac))


class Trainer:
    """One training run: the model, optimizer and data, and the step/epoch/loss counters that the
    progress lines, evaluations and saved ``training_state.json`` report."""

    def __init__(self, a: argparse.Namespace, model, processor, train: list, dev: list, n_params: int, log):
        self.a, self.model, self.processor, self.log = a, model, processor, log
        self.train, self.dev, self.dev_sub, self.n_params = train, dev, dev[: a.dev_subset], n_params
        self.opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.98), weight_decay=0.01)
        self.lengths = [len(x) for x, _ in train]
        self.labels = [torch.tensor(encode(t)) for _, t in train]
        self.max_samples = int(a.batch_seconds * SR)
        self.t0, self.step, self.epoch, self.losses = 0.0, 0, 0, []

    def minutes(self) -> float:
        """Wall-clock minutes since training started."""
        return (time.time() - self.t0) / 60

    def run(self, rng: random.Random) -> None:
        """Epochs of shuffled length-bucketed batches until the budget is spent, evaluating and
        saving every --eval-every minutes and once more, on the whole dev set, at the end."""
        a = self.a
        budget = a.minutes * 60
        self.t0 = time.time()
        next_eval, done = a.eval_every * 60, False
        self.model.train()
        while not done:
            self.epoch += 1
            for b in batches(self.lengths, self.max_samples, rng):
                frac = (time.time() - self.t0) / budget
                if frac >= 1:
                    done = True
                    break
                lr = self.train_step(b, frac)
                if self.step % 50 == 0:
                    self.log(f"step {self.step} epoch {self.epoch} {self.minutes():.1f} min "
                             f"lr {lr:.2e} loss {np.mean(self.losses[-50:]):.3f}")
                if time.time() - self.t0 >= next_eval:
                    self.evaluate_and_save()
                    next_eval += a.eval_every * 60
        self.evaluate_and_save(final=True)

    def train_step(self, b: list[int], frac: float) -> float:
        """One optimizer step (gradients clipped to norm 1) on the utterances ``b`` at the
        scheduled learning rate, which it returns."""
        lr = scheduled_lr(self.a.lr, self.a.warmup, self.step, frac)
        for g in self.opt.param_groups:
            g["lr"] = lr
        loss = self.loss(b)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.losses.append(loss.item())
        self.step += 1
        return lr

    def loss(self, b: list[int]) -> torch.Tensor:
        """CTC loss of the utterances ``b``, zero-padded with no attention mask (as wav2vec2-base)
        and computed over real frames only, mixed with the intermediate CTC losses."""
        model, lengths = self.model, self.lengths
        T = max(lengths[i] for i in b)
        x = torch.zeros(len(b), T)
        for k, i in enumerate(b):
            x[k, : lengths[i]] = torch.from_numpy(self.train[i][0])
        out = model(x, output_hidden_states=self.a.inter_ctc > 0)
        in_len = model._get_feat_extract_output_lengths(torch.tensor([lengths[i] for i in b]))
        in_len = in_len.clamp(max=out.logits.shape[1])
        tgt = [self.labels[i] for i in b]
        tgt_cat, tgt_len = torch.cat(tgt), torch.tensor([len(t) for t in tgt])

        def ctc(logits):
            lp = F.log_softmax(logits, -1, dtype=torch.float32).transpose(0, 1)
            return F.ctc_loss(lp, tgt_cat, in_len, tgt_len, blank=0, reduction="mean",
                              zero_infinity=True)

        loss = ctc(out.logits)
        if self.a.inter_ctc > 0:
            # Intermediate CTC through the shared lm_head (training-only, no new weights):
            # gives the conv front end a short gradient path, so the post-LN encoder does
            # not collapse to a constant "all blank" output before features are learned.
            inter = sum(ctc(model.lm_head(out.hidden_states[k])) for k in INTER_LAYERS)
            loss = (1 - self.a.inter_ctc) * loss + self.a.inter_ctc * inter / len(INTER_LAYERS)
        return loss

    def evaluate_and_save(self, final: bool = False) -> None:
        """Log dev WER/CER (the dev subset, or all of dev when ``final``) with each layer's time
        spread, then save the model atomically, so a killed run still leaves a usable one."""
        model, a = self.model, self.a
        subset = self.dev if final else self.dev_sub
        hyps = transcribe(model, [x for x, _ in subset])
        with torch.no_grad():  # time-variance of each layer: ~0 means a collapsed encoder
            hs = model(torch.from_numpy(subset[0][0])[None], output_hidden_states=True).hidden_states
        spread = " ".join(f"{h[0].std(0).mean().item():.2g}" for h in hs)
        w, c = wer_cer([t for _, t in subset], hyps)
        elapsed = self.minutes()
        loss = float(np.mean(self.losses[-200:])) if self.losses else float("nan")
        self.log(f"eval step {self.step} epoch {self.epoch} {elapsed:.1f} min loss {loss:.3f} "
                 f"dev{'' if final else '-subset'}({len(subset)}) WER {w:.4f} CER {c:.4f} | "
                 f"time-std {spread} | {hyps[0]!r} vs {subset[0][1]!r}")
        save(model, self.processor, a.out, dict(step=self.step, epoch=self.epoch, minutes=elapsed, loss=loss,
                                               dev_wer=w, dev_cer=c, dev_n=len(subset), parameters=self.n_params,
                                               args={k: str(v) for k, v in vars(a).items()}))
        model.train()


def load_data(a: argparse.Namespace, log) -> tuple[list, list]:
    """The training set (first --limit utterances) and the dev set, normalised, logged with
    how much audio they hold and how long reading it took."""
    t_load = time.time()
    train = load_set(a.train, a.limit)
    dev = load_set(a.dev)
    hours = sum(len(x) for x, _ in train) / SR / 3600
    log(f"loaded {len(train)} train utts ({hours:.2f} h), {len(dev)} dev in {time.time() - t_load:.0f}s")
    return train, dev


def build_model(a: argparse.Namespace, log):
    """(processor, model, parameter count): a fresh model of --arch, or the --init one."""
    processor = make_processor(a.out.with_name(a.out.name + ".vocab"))
    cls = MODEL_CLASSES[a.arch]
    model = cls.from_pretrained(a.init) if a.init else cls(make_config(a.arch))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters; args {vars(a)}")
    return processor, model, n_params


def main(argv=None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    rng = random.Random(a.seed)
    log = make_log(a.log)

    train, dev = load_data(a, log)
    processor, model, n_params = build_model(a, log)
    trainer = Trainer(a, model, processor, train, dev, n_params, log)
    trainer.run(rng)
    shutil.rmtree(a.out.with_name(a.out.name + ".vocab"), ignore_errors=True)
    log(f"done: {trainer.step} steps, {trainer.epoch} epochs, {trainer.minutes():.1f} min")


if __name__ == "__main__":
    main()
