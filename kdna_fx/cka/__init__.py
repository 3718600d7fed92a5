"""Linear CKA between the outputs of a CNN's convolutions: how alike its layers are (issue 9).

    sim = kdna_fx.cka.layer_similarity(model, images)      # every conv, transformed models included
    print(sim)                                              # the most similar pairs
    sim.plot("cka.png", compare=kdna_fx.cka.layer_similarity(kmodel, images))

Linear CKA (Kornblith et al. 2019) compares two representations of the same n examples, X [n, d_x] and
Y [n, d_y]: 1 when one is an orthogonal transform of the other up to scale, near 0 when unrelated. Across a
whole network the features do not fit in memory, so ``layer_similarity`` uses the minibatch CKA of Nguyen,
Raghu & Kornblith (2021): per batch, the unbiased HSIC estimator (Song et al. 2012) of every pair of layers
from their n x n Gram matrices, averaged over batches, then CKA = HSIC_xy / sqrt(HSIC_xx HSIC_yy).
Everything is computed in float64. See docs/cka.md.

The room: ``estimators`` (the CKA math), ``measure`` (running a model and collecting its layers' Grams),
``similarity`` (the result, its table and heat map).
"""
from __future__ import annotations

from kdna_fx.errors import CKAError

from .estimators import MinibatchCKA, gram, linear_cka, unbiased_cka, unbiased_hsic
from .measure import POOLS, Pool, layer_similarity
from .similarity import LayerSimilarity, stages

__all__ = ["CKAError", "LayerSimilarity", "MinibatchCKA", "POOLS", "Pool", "gram", "layer_similarity", "linear_cka",
           "stages", "unbiased_cka", "unbiased_hsic"]
