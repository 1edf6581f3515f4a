"""How the runs in this folder were made: `adakv-bench` with DefensiveKV's ``floor_mean`` default set first.

    python run_variant.py held|seen quality --model smollm2 --methods defensivekv --budgets 0.2 --samples 8 \
        --seed S --threads 1 --no-plots --tasks niah_single --lengths 2000 --modes aware agnostic \
        --prefill-chunk-size 512 --out DIR

(the recorded command in each results.json omits the first argument; ``*_s1_aware`` ran ``--modes aware`` only).
"""

import sys

from adakv.eval.cli import main
from adakv.scorers.defensivekv import DefensiveKV

DefensiveKV.__init__.__defaults__ = (5, sys.argv.pop(1))
sys.exit(main())
