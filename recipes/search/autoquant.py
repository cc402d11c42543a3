"""``mtq.auto_quantize`` on a speech CTC model, with StableQuant's INT8 format among the candidates.

auto_quantize (ModelOpt 0.47, ``method="gradient"``) needs a data loader, a ``forward_step`` and
a ``loss_func``; for a CTC model the natural loss is the CTC loss of the transcripts, which is
what this module supplies. Our own mixed-precision search (:mod:`recipes.search.mixed`) is the
WER/KL-driven alternative; :func:`run_auto_quantize` lets the two be compared at equal
effective bits.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from recipes.evaluation.asr import forward_logits
from recipes.runtime.distributed import DevShard
from recipes.speech.models import SpeechModel, remove_weight_norm
from recipes.speech.text import text_codec


def ctc_targets(sm: SpeechModel, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated label ids and lengths of ``texts`` as the model's vocabulary (or tokenizer)
    writes them (:mod:`recipes.speech.text`)."""
    codec = text_codec(sm)
    encoded = [codec.encode(text) for text in texts]
    return (torch.tensor([i for ids in encoded for i in ids], dtype=torch.long),
            torch.tensor([len(ids) for ids in encoded], dtype=torch.long))


def ctc_loss_func(sm: SpeechModel):
    """``loss_func(output, batch)`` for auto_quantize: mean CTC loss of the batch's transcripts."""

    def loss_func(logits: torch.Tensor, batch) -> torch.Tensor:
        from recipes.speech import family_of

        in_len = family_of(sm.model).output_lengths(sm.model, batch.lengths).clamp(max=logits.shape[1])
        targets, tgt_len = ctc_targets(sm, batch.texts)
        lp = F.log_softmax(logits, -1, dtype=torch.float32).transpose(0, 1)
        return F.ctc_loss(lp, targets, in_len, tgt_len, blank=sm.blank_id, reduction="mean", zero_infinity=True)

    return loss_func


class CtcLossChange:
    """Dev CTC loss of the transcripts minus fp32's, for :mod:`recipes.search.mixed`'s sensitivities.

    The loss of a set of logits is :func:`ctc_loss_func`'s (auto_quantize's) batch loss summed over
    the dev batches; the score subtracts fp32's on the same batches, so a layer that *helps* the
    transcripts scores below 0 (dev KL to fp32 cannot: it is at best 0).
    """

    def __init__(self, sm: SpeechModel, batches: Sequence, reference_logits: Sequence[torch.Tensor],
                 shard: DevShard | None = None):
        self.loss, self.batches = ctc_loss_func(sm), list(batches)
        self.shard = shard or DevShard.whole(len(self.batches))  # torchrun: batches are this rank's
        self.reference = self.total(reference_logits)

    def total(self, logits: Sequence[torch.Tensor]) -> float:
        """Σ over dev batches of the batch's mean CTC loss, added in global batch order (one host
        sync; under torchrun the per-batch losses are all-reduced first, as LogitDivergence does)."""
        if len(logits) != len(self.batches):
            raise ValueError(f"{len(logits)} outputs for {len(self.batches)} dev batches")
        losses = [self.loss(out, batch).double() for out, batch in zip(logits, self.batches)]
        total = 0.0
        for value in self.shard.per_batch(torch.stack(losses).cpu().tolist() if losses else []):
            total += value
        return total

    def __call__(self, logits: Sequence[torch.Tensor]) -> float:
        return self.total(logits) - self.reference


def forward_step(model: torch.nn.Module, batch) -> torch.Tensor:
    """auto_quantize's ``forward_step``: CTC logits of one batch, with gradients (unlike inference)."""
    return forward_logits(model, batch)


def run_auto_quantize(sm: SpeechModel, batches: Sequence, effective_bits: float, formats: Sequence,
                      num_calib_steps: int | None = None, num_score_steps: int | None = None,
                      verbose: bool = False) -> tuple[SpeechModel, dict]:
    """auto_quantize a copy of ``sm`` (gradient scores from the CTC loss) under ``effective_bits``.

    ``formats``: ModelOpt format dicts or names, e.g. ``[sq_plugin.STABLEQUANT_INT8_CFG,
    "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"]``. Returns the quantized copy and auto_quantize's state
    (its per-layer choices under ``"best"``).
    """
    import modelopt.torch.quantization as mtq

    import sq_plugin  # noqa: F401  (registers "stablequant")

    model = copy.deepcopy(remove_weight_norm(sm.model)).eval()
    qsm = SpeechModel(**{**sm.__dict__, "model": model})
    steps = len(batches)
    model, state = mtq.auto_quantize(
        model, constraints={"effective_bits": effective_bits}, quantization_formats=list(formats),
        data_loader=list(batches), forward_step=forward_step, loss_func=ctc_loss_func(qsm),
        num_calib_steps=num_calib_steps or steps, num_score_steps=num_score_steps or steps, verbose=verbose,
        disabled_layers=["*layer_norm*"])
    qsm.model = model.eval()
    return qsm, state
