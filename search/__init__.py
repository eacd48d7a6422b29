"""Differentiable architecture search with a device cost model (paper Sec. 3.1-3.2).

- ``search.supernet``: ``Supernet`` (mixed ops over ``pose.ops`` candidates, ``alpha``, modes mixed/sampled,
  ``derive()``), ``sample_arch`` (random legal architectures).
- ``search.cost``: ``CostTable`` / ``CostTerm`` from ``flops``, ``params``, a LUT file, a LUT URL or an agent
  URL (``load_cost``, ``build_terms``); expected cost (Eqs. 4-5) and ``lambda * log_tau(cost)`` (Eq. 6).
- ``search.loop``: ``SearchConfig``, ``run_search`` (warm-up, alternating epochs, checkpoints, resume) and
  ``run_random_search`` (the Table 3 baseline); both write OUT/arch.json, arch.png, search.json.
- ``search.cli``: ``effpose search``.
"""
