"""Experiment (#9): in a chunked prefill, a held token's score at a cut is the max of its new score and the score it
had at the previous cut (survivors keep what they earned).  python run_maxwin.py max|plain <adakv-bench args>."""

import sys

import torch

from adakv.eval.cli import main
from adakv.layer import AdaKVLayer
from adakv.selection import pack_kept

if sys.argv.pop(1) == "max":
    compacted = AdaKVLayer._compacted

    def _compacted(self, inputs, choice):
        compacted(self, inputs, choice)
        raw = choice.raw
        self._prior = None if raw is None else pack_kept(raw, choice.keep, fill=0.0)

    def _next_chunk(self, module, query, keys, values, valid, scaling, softcap):
        out = self._append(module, query, keys, values, valid, scaling, softcap, observe=False)
        store = self.store
        k_view, inside = store.view(store.keys)
        v_view, _ = store.view(store.values)
        inputs = self._inputs(query, k_view, v_view, inside, self._positions(view=True), scaling, softcap, module)
        probe = self._forget_probe()
        if probe:
            self.n_real = self.n_real - probe
        selection = self.policy.selection
        scores = selection.scorer(inputs).float()
        prior = getattr(self, "_prior", None)
        if prior is not None:
            scores = torch.maximum(scores, store.rows_to_view(prior, 0.0, k_view.shape[2]))
        choice = selection.select(
            inputs,
            self.n_real,
            self.shared.cascade,
            scores=scores,
            lookahead=probe,
            n_final=self.shared.phase.final_tokens,
        )
        store.replace(k_view, v_view, choice.keep)
        self._compacted(inputs, choice)
        return out

    AdaKVLayer._compacted = _compacted
    AdaKVLayer._next_chunk = _next_chunk
sys.exit(main())
