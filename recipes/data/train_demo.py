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


def main(argv=None) -> None:
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
    a = ap.parse_args(argv)

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    rng = random.Random(a.seed)
    logf = open(a.log, "a") if a.log else None

    def log(msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} {msg}"
        print(line, flush=True)
        if logf:
            logf.write(line + "\n")
            logf.flush()

    t_load = time.time()
    train = load_set(a.train, a.limit)
    dev = load_set(a.dev)
    dev_sub = dev[: a.dev_subset]
    hours = sum(len(x) for x, _ in train) / SR / 3600
    log(f"loaded {len(train)} train utts ({hours:.2f} h), {len(dev)} dev in {time.time() - t_load:.0f}s")

    processor = make_processor(a.out.with_name(a.out.name + ".vocab"))
    cls = MODEL_CLASSES[a.arch]
    model = cls.from_pretrained(a.init) if a.init else cls(make_config(a.arch))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters; args {vars(a)}")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.98), weight_decay=0.01)
    lengths = [len(x) for x, _ in train]
    labels = [torch.tensor(encode(t)) for _, t in train]
    max_samples = int(a.batch_seconds * SR)

    budget = a.minutes * 60
    t0 = time.time()
    next_eval, step, epoch, losses = a.eval_every * 60, 0, 0, []
    done = False

    def evaluate_and_save(final=False):
        subset = dev if final else dev_sub
        hyps = transcribe(model, [x for x, _ in subset])
        with torch.no_grad():  # time-variance of each layer: ~0 means a collapsed encoder
            hs = model(torch.from_numpy(subset[0][0])[None], output_hidden_states=True).hidden_states
        spread = " ".join(f"{h[0].std(0).mean().item():.2g}" for h in hs)
        w, c = wer_cer([t for _, t in subset], hyps)
        elapsed = (time.time() - t0) / 60
        loss = float(np.mean(losses[-200:])) if losses else float("nan")
        log(f"eval step {step} epoch {epoch} {elapsed:.1f} min loss {loss:.3f} "
            f"dev{'' if final else '-subset'}({len(subset)}) WER {w:.4f} CER {c:.4f} | "
            f"time-std {spread} | {hyps[0]!r} vs {subset[0][1]!r}")
        save(model, processor, a.out, dict(step=step, epoch=epoch, minutes=elapsed, loss=loss,
                                          dev_wer=w, dev_cer=c, dev_n=len(subset),
                                          parameters=n_params, args={k: str(v) for k, v in vars(a).items()}))
        model.train()

    model.train()
    while not done:
        epoch += 1
        for b in batches(lengths, max_samples, rng):
            frac = (time.time() - t0) / budget
            if frac >= 1:
                done = True
                break
            lr = a.lr * min(1.0, (step + 1) / a.warmup) * 0.5 * (1 + math.cos(math.pi * frac))
            for g in opt.param_groups:
                g["lr"] = lr
            T = max(lengths[i] for i in b)
            x = torch.zeros(len(b), T)
            for k, i in enumerate(b):
                x[k, : lengths[i]] = torch.from_numpy(train[i][0])
            # Zero-padded, no attention mask (as wav2vec2-base); CTC only over real frames.
            out = model(x, output_hidden_states=a.inter_ctc > 0)
            in_len = model._get_feat_extract_output_lengths(torch.tensor([lengths[i] for i in b]))
            in_len = in_len.clamp(max=out.logits.shape[1])
            tgt = [labels[i] for i in b]
            tgt_cat, tgt_len = torch.cat(tgt), torch.tensor([len(t) for t in tgt])

            def ctc(logits):
                lp = F.log_softmax(logits, -1, dtype=torch.float32).transpose(0, 1)
                return F.ctc_loss(lp, tgt_cat, in_len, tgt_len, blank=0, reduction="mean",
                                  zero_infinity=True)

            loss = ctc(out.logits)
            if a.inter_ctc > 0:
                # Intermediate CTC through the shared lm_head (training-only, no new weights):
                # gives the conv front end a short gradient path, so the post-LN encoder does
                # not collapse to a constant "all blank" output before features are learned.
                inter = sum(ctc(model.lm_head(out.hidden_states[k])) for k in INTER_LAYERS)
                loss = (1 - a.inter_ctc) * loss + a.inter_ctc * inter / len(INTER_LAYERS)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            step += 1
            if step % 50 == 0:
                log(f"step {step} epoch {epoch} {(time.time() - t0) / 60:.1f} min "
                    f"lr {lr:.2e} loss {np.mean(losses[-50:]):.3f}")
            if time.time() - t0 >= next_eval:
                evaluate_and_save()
                next_eval += a.eval_every * 60
    evaluate_and_save(final=True)
    shutil.rmtree(a.out.with_name(a.out.name + ".vocab"), ignore_errors=True)
    log(f"done: {step} steps, {epoch} epochs, {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
