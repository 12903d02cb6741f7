"""Ops: reference, chunked-torch and Triton implementations of the early-exit head computations.

Layout (after linkedin/Liger-Kernel, split so that triton stays a lazy import):

- ``exit_head_loss.py`` / ``exit_confidence.py``: the public functions (argument checks, dispatch on
  ``impl``), the pure-torch reference (``impl="naive"``) and the chunked pure-torch path
  (``impl="chunked"``, a custom ``torch.autograd.Function``). torch only.
- ``exit_head_loss_triton.py`` / ``exit_confidence_triton.py`` / ``rms_norm_triton.py``: the
  ``@triton.jit`` kernels, their launchers and the autograd Function. Imported only for ``impl="triton"``.
- ``utils.py``: shape checks, RMSNorm reference, impl resolution, Triton environment checks.

Design (why these kernels exist)
--------------------------------
An early-exit ("familial") model trains K exits with one shared LM head (V x D). The obvious loss
materialises K logits tensors of N x V fp32: at N=16384, V=128256, K=4 that is 33.6 GB before the
softmax and its backward copies. Here the logits never exist as a whole:

- Forward: for a tile of tokens, the kernel walks the vocabulary in tiles of ``BLOCK_V`` columns,
  computes that logits tile with ``tl.dot`` (fp32 accumulation), and folds it into an online
  log-sum-exp (running max ``m`` and rescaled sum ``l``, as in flash attention) while picking up the
  target logit when the label falls in the tile. Only ``lse`` (K x N fp32) and the per-row losses are
  written. With a shared head, one program holds the token tile for all K exits, so each weight tile is
  read once for all exits.
- Backward recomputes each logits tile from the (recomputed) normalised hidden states and the saved
  ``lse``: ``dlogits = scale_k * (softmax - onehot)`` exists one tile at a time and is immediately
  contracted into ``grad_hidden`` (dlogits @ W) and ``grad_W`` (dlogits^T @ y), both accumulated in fp32
  (atomics across vocab tiles / token tiles, the approach of "Cut Your Losses in Large-Vocabulary
  Language Models", Wijmans et al. 2024). RMSNorm is a separate small kernel pair; its backward turns
  ``grad_y`` into ``grad_hidden`` and ``grad_norm_weight``.
- The trade-off: the head matmul is done twice (forward, recompute in backward), i.e. 4 instead of 3
  matmuls of size N x V x D per exit, in exchange for O(N*K) instead of O(N*K*V) extra memory. The
  chunked torch path makes the same trade with chunks of tokens instead of register tiles and is
  measured in ``benchmarks/RESULTS.md``.
"""
