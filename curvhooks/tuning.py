"""Every tuned constant of curvhooks. Each picks between two exact ways to compute the same
numbers, by speed or memory; none changes a result. What each was measured on, and how, is
in docs/benchmarks/tuning.md."""

FEW_VECTORS = 16
"""Stacks of at most this many vectors (with ``FEW_INPUTS``) have their squared per-sample
weight products summed one vector at a time instead of by one product of the folded stack."""

FEW_INPUTS = 64
"""Weights meeting fewer inputs per output than this (with ``FEW_VECTORS``): see there."""

SMALL_STACK = 2**16
"""Stacks with fewer entries are pushed through a strided convolution by a dilated
convolution instead of the transposed one (CPU)."""

UNFOLD_LIMIT = 2**23
"""Entries of a convolution's unfolded input up to which the per-sample weight products of
one vector come from it instead of a grouped convolution (CPU)."""

CHANNELS_LAST = 1024
"""Input positions (2-D) from which stacks are pushed through a convolution in
channels-last layout."""

GRAPH_CHUNK_BYTES = {"cpu": 2**25, "cuda": 2**30}
"""Most bytes of stacks that one batched autograd product returns on the graph route, by
device type (others: the CPU's); larger stacks are pushed in chunks of vectors."""

HESSIAN_CHUNK_SIZES = {"cpu": 256, "cuda": 1024}
"""Directions per vectorised Hessian-vector product of the autograd Hessian, by device type
(others: the CPU's)."""

COLUMN_CHUNK_BYTES = {"cpu": 2**25, "cuda": 2**30}
"""Most bytes of a batch's module outputs times columns that one vectorised product of the
data operators (``GGNOperator``, ``EmpiricalFisherOperator``, ``HessianOperator``) carries,
by device type (others: the CPU's); more columns run in chunks (at least one each)."""

PANEL = 512
"""Most rows of a panel in which Gram matrices ``F^T F`` of factors are built, each from its
diagonal on."""

FACTOR_PRODUCT_COLUMNS = 4
"""``GGNOperator @ V`` with at least this many columns takes each batch's square-root factor
``F`` from the hooks and multiplies ``F^T (F V)`` (where ``F`` fits ``FACTOR_PRODUCT_BYTES``)
instead of forward- and reverse-mode products per column."""

FACTOR_PRODUCT_BYTES = 2**28
"""Most bytes of one batch's square-root factor for ``FACTOR_PRODUCT_COLUMNS``."""
