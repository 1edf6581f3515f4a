"""Experiment: chunk_scores="max" on scale-free scores: each cut's scores divided by their mean over the layer's
candidates (per sequence) before the max.  python run_maxnorm.py <adakv-bench args with --chunk-scores max>."""

import sys

import torch

from adakv.eval.cli import main
from adakv.layer import AdaKVLayer
from adakv.scorers import Scorer


def scale_free(scores, inputs):
    valid = inputs.valid & torch.isfinite(scores)
    mean = (scores.float() * valid).sum((1, 2), keepdim=True) / valid.sum((1, 2), keepdim=True).clamp_min(1)
    return scores.float() / mean.clamp_min(1e-30)


def wrap(scorer_call):
    def scored(self, inputs):
        return scale_free(scorer_call(self, inputs), inputs)

    return scored


patched = set()
orig_init = AdaKVLayer.__init__


def init(self, policy, *args, **kwargs):
    orig_init(self, policy, *args, **kwargs)
    cls = type(policy.selection.scorer)
    if cls not in patched and issubclass(cls, Scorer):
        cls.__call__ = wrap(cls.__call__)
        patched.add(cls)


AdaKVLayer.__init__ = init
sys.exit(main())
