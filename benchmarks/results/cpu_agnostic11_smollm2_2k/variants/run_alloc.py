"""`adakv-bench` with extra presets registered first (KVzip+ scores with other allocators)."""

import sys

from adakv.allocators import AdaKV, Uniform
from adakv.eval.cli import main
from adakv.methods import METHODS, Method
from adakv.scorers import KVzip

METHODS["kvzip+ada"] = Method(lambda: KVzip(normalize=True), AdaKV, "KVzip+ with AdaKV per layer")
METHODS["kvzip+uniform"] = Method(lambda: KVzip(normalize=True), Uniform, "KVzip+ uniform")
sys.exit(main())
