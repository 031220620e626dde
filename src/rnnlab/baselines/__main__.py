"""`python -m rnnlab.baselines task=<task>`: the baseline stage (rnnlab.baselines)."""

from rnnlab.baselines import main

main()
