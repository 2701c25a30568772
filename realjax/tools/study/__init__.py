"""``realjax study``: a CPU mini-replication of the paper's Table 1 (``runs``: plan and run objectives x
seeds; ``design``: what is compared under which budget; ``results``: runs read back and statistics over
seeds; ``report``: summary.md; ``figures``; ``mechanism``: the gradient-weight table). The command is
``realjax.cli.study``."""
