"""lm-evaluation-harness adapter: the model `dlm` (needs the `eval` extra: pip install 'dlm-pretrain[eval]').

    python -m pretrain.lm_eval_harness --model dlm --model_args run=RUN_DIR,mc_samples=128 --tasks TASKS
    # in Python: import pretrain.lm_eval_harness; lm_eval.simple_evaluate(model="dlm", model_args="run=RUN_DIR", ...)

`python -m pretrain.lm_eval_harness` is lm-eval's own command line (`lm_eval ...`, every option
the same) with `dlm` registered: lm-eval 0.4 discovers models from its built-in list only (no
plugin entry point), so the bare `lm_eval` command cannot see a model another package defines.

Requests, for a run of any variant (weights: the moving average when the run kept one; `ema=false`
for the raw weights; the run's own tokenizer; `[BOS]` is prepended to every context):
- loglikelihood(context, continuation): the continuation's tokens are those that follow the
  context's in the encoding of the joined text (lm-eval's HFLM convention). `ar`: exact, sum of next-token log-probabilities of the
  continuation. Diffusion variants: minus the run's validation bound (the uniform-t NELBO of
  `objective.eval_nll`, the one `val/nll` reports) on the continuation with `[BOS] context` clean
  and visible as a prompt: a lower bound on log p(continuation | context), estimated with
  `mc_samples` Monte Carlo draws of (t, mask) (default 128; LLaDA uses 128 as well), stratified in t,
  seeded (`seed`), so repeated runs agree. A context too long for data.seq_len is cut from the left.
  is_greedy: for `ar` whether every continuation token is the argmax; for diffusion variants
  whether each continuation token is the argmax with the whole continuation masked (one forward).
- loglikelihood_rolling(text): the same bound (exact for `ar`) over windows of data.seq_len - 1
  tokens after `[BOS]`, each window scored given nothing but `[BOS]` (no overlap: a lower bound on
  what overlapping windows would give).
- generate_until(context, {until, max_gen_toks}): the run's own sampler (pretrain.generate;
  `sampler`, `steps`, `temperature` default 0 = greedy), max_gen_toks positions (default 32, cut to
  what fits), the text cut at the first `until` string.
"""

from __future__ import annotations

import sys

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from common.device import resolve_device
from pretrain.generate import generate_text, load_run
from pretrain.sample import SamplerConfig
from pretrain.variants import objective_for


@register_model("dlm")
class DLMEvalHarness(LM):
    def __init__(self, run: str, mc_samples: int | str = 128, seed: int | str = 0, ema: bool | str | None = None,
                 sampler: str = "auto", steps: int | str = 0, temperature: float | str = 0.0,
                 device: str | None = None, batch_size: int | str | None = None, **_ignored):
        super().__init__()
        if isinstance(ema, str):
            ema = ema.lower() in ("1", "true", "yes")
        dev = device or "auto"
        if dev.startswith("cuda") and not torch.cuda.is_available():  # lm-eval's command line defaults to cuda
            print(f"warning: device {dev} requested but CUDA is not available; running on cpu", file=sys.stderr)
            dev = "cpu"
        self._device = resolve_device(dev, "device")
        self.model, self.info, self.cfg, self.tok = load_run(run, self._device, ema=ema)
        self.variant = self.cfg.model.variant
        self.mc_samples = int(mc_samples)
        if self.mc_samples < 1:
            raise ValueError(f"mc_samples must be at least 1, got {mc_samples}")
        self.seed = int(seed)
        self.objective = objective_for(self.cfg, self.tok.mask_id)
        self.sampler, self.steps, self.temperature = sampler, int(steps), float(temperature)
        self.seq_len = self.cfg.data.seq_len

    # -- scoring --------------------------------------------------------------------------------

    def _row(self, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
        """([BOS] context continuation, length of the `[BOS] context` prefix), cut to data.seq_len."""
        if len(continuation) + 1 > self.seq_len:
            raise ValueError(f"a continuation of {len(continuation)} tokens does not fit data.seq_len = {self.seq_len}")
        context = context[max(0, len(context) + len(continuation) + 1 - self.seq_len):]
        return [self.tok.bos_id, *context, *continuation], 1 + len(context)

    @torch.no_grad()
    def _score(self, ids: list[int], n_prompt: int) -> tuple[float, bool]:
        """(log-likelihood of ids[n_prompt:] given ids[:n_prompt], is_greedy)."""
        x = torch.tensor([ids], device=self._device)
        L = x.shape[1]
        prompt = torch.zeros(1, L, dtype=torch.bool, device=self._device)
        prompt[:, :n_prompt] = True
        if self.variant == "ar":
            logp = torch.log_softmax(self.model(x).double(), -1)[0, n_prompt - 1: L - 1]
            target = x[0, n_prompt:]
            ll = float(logp.gather(-1, target[:, None]).sum())
            return ll, bool((logp.argmax(-1) == target).all())
        # the NELBO: the row repeated `reps` times, K / reps draws of t each (one batched forward per draw)
        reps = min(self.mc_samples, 32)
        self.objective.eval_t_samples = max(1, self.mc_samples // reps)
        batch = {"input_ids": x.repeat(reps, 1), "loss_mask": torch.ones(reps, L, dtype=torch.bool, device=self._device),
                 "prompt_mask": prompt.repeat(reps, 1)}
        generator = torch.Generator().manual_seed(self.seed)
        nelbo, _ = self.objective.eval_nll(self.model, batch, generator)
        masked = x.clone()
        masked[~prompt] = self.tok.mask_id
        t = torch.ones(1, device=self._device)
        logits = self.model(masked, t, prompt_mask=prompt if self._needs_prompt_mask else None)[0, n_prompt:]
        logits[:, self.tok.mask_id] = float("-inf")
        return -nelbo / reps, bool((logits.argmax(-1) == x[0, n_prompt:]).all())

    @property
    def _needs_prompt_mask(self) -> bool:
        return self.variant in ("scatter", "jigsaw")

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation as the text reads them joined (as lm-eval's HFLM does):
        the continuation's tokens are what follows the context's in encode(context + continuation)."""
        n_space = len(context) - len(context.rstrip(" "))
        if n_space:  # trailing spaces belong to the continuation (lm-eval's convention)
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        ctx = self.tok.encode(context) if context else []
        whole = self.tok.encode(context + continuation)
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx):]
        return ctx, self.tok.encode(continuation)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            ids, n_prompt = self._row(*self._encode_pair(*req.args))
            out.append(self._score(ids, n_prompt))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        width = self.seq_len - 1
        for req in requests:
            (text,) = req.args
            ids = self.tok.encode(text)
            out.append(sum(self._score([self.tok.bos_id, *ids[i: i + width]], 1)[0] for i in range(0, len(ids), width)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ctx = self.tok.encode(context)
            n_new = int(kwargs.get("max_gen_toks", 32))
            keep = max(0, self.seq_len - 1 - min(n_new, self.seq_len - 2))
            ctx = ctx[len(ctx) - keep:] if len(ctx) > keep else ctx
            n_new = min(n_new, self.seq_len - 1 - len(ctx))
            scfg = SamplerConfig(name=self.sampler, steps=self.steps, temperature=float(kwargs.get("temperature", self.temperature)),
                                 seed=self.seed)
            text = generate_text(self.model, self.cfg, self.tok, "", n_new, 1, scfg, prompt_ids=ctx).texts[0]
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with the `dlm` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
