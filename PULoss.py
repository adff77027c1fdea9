"""Non-negative (nnPU), unbiased (uPU) and PNU risk estimators as Keras 3 losses.

Positive-unlabeled (PU) learning trains a binary classifier from positive (P)
examples and unlabeled (U) examples, a mixture of positives and negatives with
a known positive fraction, the class prior. In this project the positive class
is plain background sky and the negative class is aurora.

Conventions used everywhere in this module:

* ``y_pred`` holds one real-valued score (a logit) per sample; a score > 0
  means positive.
* PU labels: +1 positive, -1 unlabeled. PNU labels: +1 positive, -1 negative,
  0 unlabeled. Float or integer labels of shape ``(batch,)`` or
  ``(batch, 1)`` are accepted; labels and scores are flattened to 1-D before
  anything else, so they can never broadcast to ``(batch, batch)``.
* The risks are batch-level means, so each loss returns one scalar per batch.
  The ``reduction`` argument is accepted for API compatibility but every
  reduction of a scalar is the scalar itself; per-sample weights are refused.

Everything is written with ``keras.ops`` only (no Python control flow on
tensors), so the losses run on every Keras backend, inside ``fit`` and under
``jit_compile=True``. The class prior the losses need can be estimated from
a P-versus-U classifier's held-out scores with ``bbe_prior`` (plain numpy).

References
----------
.. [1] M. C. du Plessis, G. Niu, M. Sugiyama. "Convex formulation for
   learning from positive and unlabeled data." ICML 2015 (uPU).
.. [2] R. Kiryo, G. Niu, M. C. du Plessis, M. Sugiyama. "Positive-unlabeled
   learning with non-negative risk estimator." NeurIPS 2017 (nnPU).
.. [3] T. Sakai, M. C. du Plessis, G. Niu, M. Sugiyama. "Semi-supervised
   classification based on classification from positive and unlabeled data."
   ICML 2017 (PNU).
.. [4] G. Su, W. Chen, M. Xu. "Positive-unlabeled learning from imbalanced
   data." IJCAI 2021 (the class-balanced nnPU risk).
.. [5] S. Garg, Y. Wu, A. Smola, S. Balakrishnan, Z. Lipton. "Mixture
   proportion estimation and PU learning: a modern approach." NeurIPS 2021
   (BBE, the class prior from a classifier's scores).
"""

import keras
import numpy as np
from keras import ops

SURROGATE_LOSSES = ("sigmoid", "logistic")


def surrogate(z, loss="sigmoid"):
    """Surrogate of the zero-one loss for the margin ``z``, elementwise.

    ``l(z) = sigmoid(-z)`` for ``"sigmoid"`` (bounded, as in [2]) and
    ``l(z) = softplus(-z) = log(1 + exp(-z))`` for ``"logistic"``. Both are
    decreasing in ``z``: the loss of scoring a positive with ``z``, and of
    scoring a negative with ``-z``.
    """
    if loss == "sigmoid":
        return ops.sigmoid(-z)
    if loss == "logistic":
        return ops.softplus(-z)
    raise ValueError(
        f"Invalid loss: expected one of {SURROGATE_LOSSES}, received {loss!r}"
    )


def _flatten(y_true, y_pred):
    # Keras passes labels as (batch,) and scores as (batch, 1); comparing those
    # without flattening would silently broadcast to (batch, batch).
    y_pred = ops.reshape(ops.convert_to_tensor(y_pred), (-1,))
    y_true = ops.cast(ops.reshape(ops.convert_to_tensor(y_true), (-1,)), y_pred.dtype)
    return y_true, y_pred


def _masked_mean(values, mask):
    # The count is floored at 1 so that a batch without this class gives a
    # zero mean instead of a division by zero ([2], reference code).
    return ops.sum(values * mask) / ops.maximum(ops.sum(mask), 1.0)


def pu_risk(y_true, y_pred, prior, loss="sigmoid"):
    """The parts of the unbiased PU risk of one batch ([1], [2] eq. 3).

    Parameters
    ----------
    y_true : tensor of shape (batch,) or (batch, 1)
        +1 for positive (background), -1 for unlabeled. Other values are
        **silently ignored**: a loss inside a compiled graph cannot raise,
        so 0/1 labels give a batch with no unlabeled sample (Ru- = 0), a
        negative Rn and nnPU's gradient ascent in every step. Check labels
        where they are made (``data.check_labels``).
    y_pred : tensor of shape (batch,) or (batch, 1)
        Logits; > 0 means positive.
    prior : float
        Class prior, the fraction of positives among the unlabeled data.
    loss : {"sigmoid", "logistic"}
        The surrogate loss ``l``.

    Returns
    -------
    dict of scalar tensors
        ``Rp_plus`` = mean over P of l(z), ``Rp_minus`` = mean over P of
        l(-z), ``Ru_minus`` = mean over U of l(-z), ``positive_risk`` =
        prior * Rp_plus, ``negative_risk`` = Ru_minus - prior * Rp_minus
        (the estimate of (1 - prior) times the risk on negatives; it can be
        negative for a flexible model, which is what nnPU corrects).
    """
    y_true, y_pred = _flatten(y_true, y_pred)
    positive = ops.cast(ops.equal(y_true, 1.0), y_pred.dtype)
    unlabeled = ops.cast(ops.equal(y_true, -1.0), y_pred.dtype)
    Rp_plus = _masked_mean(surrogate(y_pred, loss), positive)
    Rp_minus = _masked_mean(surrogate(-y_pred, loss), positive)
    Ru_minus = _masked_mean(surrogate(-y_pred, loss), unlabeled)
    return {
        "Rp_plus": Rp_plus,
        "Rp_minus": Rp_minus,
        "Ru_minus": Ru_minus,
        "positive_risk": prior * Rp_plus,
        "negative_risk": Ru_minus - prior * Rp_minus,
    }


def non_negative_objective(positive_risk, negative_risk, gamma=1.0, beta=0.0, nnPU=True, ascent=None):
    """Combine the two partial risks as uPU or nnPU ([2], Algorithm 1).

    uPU (``nnPU=False``): value and gradient of ``positive_risk +
    negative_risk``. nnPU: the same while ``negative_risk >= -beta``;
    otherwise the value reported is ``positive_risk - beta`` but the gradient
    back-propagated is that of ``-gamma * ascent`` (``ascent`` defaults to
    ``negative_risk``), a step of gradient ascent that pushes the negative
    risk back up. This mirrors the reference Chainer implementation
    (kiryor/nnPUlearning), which reports one value and back-propagates
    another. Both branches are computed and one is selected with
    ``ops.where``; the reported value is attached to the back-propagated
    graph with ``stop_gradient``. ``gamma`` comes before ``beta`` here as in
    every function and class of this module.

    Returns
    -------
    scalar tensor
        Numerically the reported value; its gradient is the back-propagated
        one.
    """
    upu = positive_risk + negative_risk
    if not nnPU:
        return upu
    corrected = negative_risk < -beta
    reported = ops.where(corrected, positive_risk - beta, upu)
    ascent = negative_risk if ascent is None else ascent
    backpropagated = ops.where(corrected, -gamma * ascent, upu)
    return backpropagated + ops.stop_gradient(reported - backpropagated)


def class_weights(prior, balanced):
    """Weights of the positive and negative partial risks: (1, 1), or ([4]) the class-balanced pair.

    Balanced, the risk counts both classes equally whatever the prior:
    ``0.5 / prior`` on ``prior * Rp+`` and ``0.5 / (1 - prior)`` on the
    negative risk, which is the imbalanced nnPU risk of [4] with its target
    prior 0.5. A logit > 0 then means that the patch is more likely under
    the background's distribution than under the aurora's (a likelihood
    ratio above 1), not that background is more probable in U.

    The nnPU correction still ascends the unweighted negative risk
    (`pu_loss`): weighted, its step grows with 0.5 / (1 - prior), 12-fold at
    a prior of 0.96, and with the unbounded logistic loss each such step
    pushes every P patch toward aurora hard enough to end in "aurora
    everywhere".
    """
    if not balanced:
        return 1.0, 1.0
    return 0.5 / prior, 0.5 / (1.0 - prior)


def pu_loss(y_true, y_pred, prior, loss="sigmoid", gamma=1.0, beta=0.0, nnPU=True, balanced=False):
    """nnPU (default) or uPU objective of one batch, a scalar tensor.

    Labels +1 positive, -1 unlabeled; ``y_pred`` logits, > 0 positive. See
    `pu_risk` for the parts, `class_weights` for ``balanced`` and
    `non_negative_objective` for which value is reported and which gradient
    is back-propagated.
    """
    risk = pu_risk(y_true, y_pred, prior, loss)
    positive_weight, negative_weight = class_weights(prior, balanced)
    return non_negative_objective(
        positive_weight * risk["positive_risk"], negative_weight * risk["negative_risk"], gamma, beta, nnPU,
        ascent=risk["negative_risk"],
    )


def pnu_risk(y_true, y_pred, prior, loss="sigmoid"):
    """The parts of the PN, PU and NU risks of one batch ([3], section 3).

    Parameters
    ----------
    y_true : tensor of shape (batch,) or (batch, 1)
        +1 positive, -1 negative, 0 unlabeled.
    y_pred : tensor of shape (batch,) or (batch, 1)
        Logits; > 0 means positive.
    prior : float
        Class prior theta_P of the positives; theta_N = 1 - prior.
    loss : {"sigmoid", "logistic"}

    Returns
    -------
    dict of scalar tensors
        With E_X the mean over the samples labelled X and g the logit:
        ``pn_risk`` = theta_P E_P[l(g)] + theta_N E_N[l(-g)];
        ``pu_positive`` = theta_P E_P[l(g)] and
        ``pu_negative`` = E_U[l(-g)] - theta_P E_P[l(-g)], whose sum is the
        PU risk; ``nu_negative`` = theta_N E_N[l(-g)] and
        ``nu_positive`` = E_U[l(g)] - theta_N E_N[l(g)], whose sum is the
        NU risk.
    """
    y_true, y_pred = _flatten(y_true, y_pred)
    positive = ops.cast(ops.equal(y_true, 1.0), y_pred.dtype)
    negative = ops.cast(ops.equal(y_true, -1.0), y_pred.dtype)
    unlabeled = ops.cast(ops.equal(y_true, 0.0), y_pred.dtype)
    loss_as_positive = surrogate(y_pred, loss)
    loss_as_negative = surrogate(-y_pred, loss)
    Rp_plus = _masked_mean(loss_as_positive, positive)
    Rp_minus = _masked_mean(loss_as_negative, positive)
    Rn_plus = _masked_mean(loss_as_positive, negative)
    Rn_minus = _masked_mean(loss_as_negative, negative)
    Ru_plus = _masked_mean(loss_as_positive, unlabeled)
    Ru_minus = _masked_mean(loss_as_negative, unlabeled)
    theta_n = 1.0 - prior
    return {
        "pn_risk": prior * Rp_plus + theta_n * Rn_minus,
        "pu_positive": prior * Rp_plus,
        "pu_negative": Ru_minus - prior * Rp_minus,
        "nu_negative": theta_n * Rn_minus,
        "nu_positive": Ru_plus - theta_n * Rn_plus,
    }


def pnu_loss(y_true, y_pred, prior, eta, loss="sigmoid", gamma=1.0, beta=0.0, nnPU=True):
    """PNU objective of one batch ([3], eq. 7), a scalar tensor.

    For ``eta >= 0``: ``(1 - eta) * R_PN + eta * R_PU``; for ``eta < 0``:
    ``(1 + eta) * R_PN - eta * R_NU``. ``eta = 0`` is supervised PN learning,
    ``eta = 1`` is PU and ``eta = -1`` is NU learning. With ``nnPU=True`` the
    PU part gets the non-negative correction of [2] on its negative-risk
    estimate, and the NU part the same on its positive-risk estimate, with
    the value/gradient rule of `non_negative_objective`. That correction is
    this project's extension, on by default: [3] minimises the plain risks,
    whose PU and NU parts can go negative for a flexible model just as uPU's
    do. ``nnPU=False`` gives [3]'s eq. 7 exactly.

    Labels: +1 positive, -1 negative, 0 unlabeled.
    """
    risk = pnu_risk(y_true, y_pred, prior, loss)
    pu = non_negative_objective(risk["pu_positive"], risk["pu_negative"], gamma, beta, nnPU)
    nu = non_negative_objective(risk["nu_negative"], risk["nu_positive"], gamma, beta, nnPU)
    if eta >= 0:
        return (1.0 - eta) * risk["pn_risk"] + eta * pu
    return (1.0 + eta) * risk["pn_risk"] - eta * nu


def pu_zero_one_risk(y_true, y_pred, prior):
    """PU estimate of the zero-one classification risk, needing no negatives.

    ``2 * prior * err_P + err_U - prior`` ([2], section 5), where err_P is the
    fraction of positives scored <= 0 and err_U the fraction of unlabeled
    scored > 0. It equals the misclassification rate on the distribution the
    unlabeled data come from, so it can select models and epochs.

    Labels +1 positive, -1 unlabeled; ``y_pred`` logits, > 0 positive.
    """
    y_true, y_pred = _flatten(y_true, y_pred)
    positive = ops.cast(ops.equal(y_true, 1.0), y_pred.dtype)
    unlabeled = ops.cast(ops.equal(y_true, -1.0), y_pred.dtype)
    err_p = _masked_mean(ops.cast(y_pred <= 0, y_pred.dtype), positive)
    err_u = _masked_mean(ops.cast(y_pred > 0, y_pred.dtype), unlabeled)
    return 2.0 * prior * err_p + err_u - prior


def _check_hyperparameters(prior, loss, gamma, beta):
    try:
        prior = float(prior)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid prior: expected a number in (0, 1), received {prior!r}") from None
    if not 0.0 < prior < 1.0:
        raise ValueError(f"Invalid prior: expected 0 < prior < 1, received {prior}")
    if loss not in SURROGATE_LOSSES:
        raise ValueError(f"Invalid loss: expected one of {SURROGATE_LOSSES}, received {loss!r}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"Invalid gamma: expected 0 <= gamma <= 1, received {gamma}")
    if beta < 0.0:
        raise ValueError(f"Invalid beta: expected beta >= 0, received {beta}")
    return prior


class _BatchRiskLoss(keras.losses.Loss):
    # The risks are batch-level means, so a per-sample weight has no meaning.
    def __call__(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError(
                f"{type(self).__name__} does not support sample_weight: "
                "the risk is a batch-level quantity; weight the classes with prior instead"
            )
        return super().__call__(y_true, y_pred)


@keras.saving.register_keras_serializable(package="PULoss")
class PULoss(_BatchRiskLoss):
    """Non-negative (nnPU) or unbiased (uPU) PU loss for ``model.compile``.

    Parameters
    ----------
    prior : float
        Class prior in (0, 1): the fraction of positives (background) among
        the unlabeled samples.
    loss : {"sigmoid", "logistic"}
        Surrogate loss, ``sigmoid(-z)`` or ``softplus(-z)``.
    gamma : float in [0, 1]
        Step size of the gradient ascent on the negative risk when nnPU
        corrects ([2], Algorithm 1).
    beta : float >= 0
        Tolerance: the correction fires when the negative risk < -beta.
    nnPU : bool
        True for nnPU, False for uPU.
    balanced : bool
        Weigh the two classes equally ([4], `class_weights`), so that a rare
        class (aurora at a prior of 0.95) still counts: without it the
        all-background model has the small risk ``1 - prior`` and training
        can settle there.
    name, reduction, dtype
        As for every ``keras.losses.Loss``. The loss of a batch is a scalar,
        so all reductions give the same value.

    Notes
    -----
    Labels: +1 positive, -1 unlabeled, shape (batch,) or (batch, 1), float
    or int; any other value is silently ignored (0/1 labels train nothing
    useful: see `pu_risk`), so check them (``data.check_labels``).
    Predictions: one logit per sample, > 0 positive. When the
    correction fires, the value reported is ``prior * Rp+ - beta`` but the
    gradient is that of ``-gamma * Rn`` (see `non_negative_objective`).

    Examples
    --------
    >>> model.compile(optimizer="adam", loss=PULoss(prior=0.7))
    >>> model.fit(x, y)  # y: +1 for P samples, -1 for U samples
    """

    def __init__(self, prior, loss="sigmoid", gamma=1.0, beta=0.0, nnPU=True, balanced=False,
                 name="pu_loss", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.prior = _check_hyperparameters(prior, loss, gamma, beta)
        self.loss = loss
        self.gamma = float(gamma)
        self.beta = float(beta)
        self.nnPU = bool(nnPU)
        self.balanced = bool(balanced)

    def call(self, y_true, y_pred):
        return pu_loss(y_true, y_pred, self.prior, self.loss, self.gamma, self.beta, self.nnPU, self.balanced)

    def get_config(self):
        config = super().get_config()
        config.update(prior=self.prior, loss=self.loss, gamma=self.gamma,
                      beta=self.beta, nnPU=self.nnPU, balanced=self.balanced)
        return config


@keras.saving.register_keras_serializable(package="PULoss")
class PNULoss(_BatchRiskLoss):
    """PNU loss ([3]): positive, negative and unlabeled data together.

    Parameters
    ----------
    prior : float
        Class prior of the positives, in (0, 1).
    eta : float in [-1, 1]
        Mix of the PN risk with the PU risk (eta > 0) or the NU risk
        (eta < 0); see `pnu_loss` for the formula.
    loss, gamma, beta, nnPU, name, reduction, dtype
        As for `PULoss`; the non-negative correction applies to the PU or NU
        part.

    Notes
    -----
    Labels: +1 positive, -1 negative, 0 unlabeled.
    """

    def __init__(self, prior, eta, loss="sigmoid", gamma=1.0, beta=0.0, nnPU=True,
                 name="pnu_loss", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.prior = _check_hyperparameters(prior, loss, gamma, beta)
        try:
            eta = float(eta)
        except (TypeError, ValueError):
            raise ValueError(f"Invalid eta: expected a number in [-1, 1], received {eta!r}") from None
        if not -1.0 <= eta <= 1.0:
            raise ValueError(f"Invalid eta: expected -1 <= eta <= 1, received {eta}")
        self.eta = eta
        self.loss = loss
        self.gamma = float(gamma)
        self.beta = float(beta)
        self.nnPU = bool(nnPU)

    def call(self, y_true, y_pred):
        return pnu_loss(y_true, y_pred, self.prior, self.eta, self.loss,
                        self.gamma, self.beta, self.nnPU)

    def get_config(self):
        config = super().get_config()
        config.update(prior=self.prior, eta=self.eta, loss=self.loss,
                      gamma=self.gamma, beta=self.beta, nnPU=self.nnPU)
        return config


# ------------------------------------------------------------ the class prior

def _bbe_point(p_sorted, u_sorted, delta, gamma, min_p_mass=0.0):
    """BBE on sorted score arrays: the estimate q_U(c*) / q_P(c*) and its bound half-width."""
    n_p, n_u = len(p_sorted), len(u_sorted)
    thresholds = np.unique(np.concatenate([p_sorted, u_sorted]))
    # q(c): fraction of scores >= c, for every candidate threshold c.
    q_p = (n_p - np.searchsorted(p_sorted, thresholds, side="left")) / n_p
    q_u = (n_u - np.searchsorted(u_sorted, thresholds, side="left")) / n_u
    usable = q_p >= max(min_p_mass, 1 / n_p) - 1e-12
    q_p, q_u = q_p[usable], q_u[usable]
    # Garg et al. (2021), eq. (3): the DKW deviation of both tails, divided by q_P(c).
    width = (1 + gamma) * (np.sqrt(np.log(4 / delta) / (2 * n_p)) + np.sqrt(np.log(4 / delta) / (2 * n_u))) / q_p
    ratio = q_u / q_p
    best = np.argmin(ratio + width)
    return float(np.clip(ratio[best], 0.0, 1.0)), float(width[best])


def bbe_prior(p_scores, u_scores, delta=0.1, gamma=0.01, n_bootstrap=200, seed=0, min_p_mass=0.0):
    """Best Bin Estimation of the fraction of U that is drawn like P.

    Garg, Wu, Smola, Balakrishnan & Lipton, "Mixture proportion estimation
    and PU learning: a modern approach", NeurIPS 2021, Algorithm 1. With a
    P-versus-U classifier's scores on held-out samples, for each threshold c
    q_P(c) and q_U(c) are the fractions of P and U scoring >= c. Where the
    top bin holds (almost) only P-like samples, q_U(c) / q_P(c) is the prior.
    The threshold minimises the upper confidence bound

        q_U(c) / q_P(c) + (1 + gamma) / q_P(c) * (sqrt(log(4/delta) / (2 n_P)) + sqrt(log(4/delta) / (2 n_U)))

    over the held-out scores, and the estimate is q_U(c*) / q_P(c*) clipped to [0, 1].

    Parameters
    ----------
    p_scores : ndarray of shape (n_P,), float
        Scores of held-out positive (background) samples, higher = more P-like.
    u_scores : ndarray of shape (n_U,), float
        Scores of held-out unlabeled samples, from the same classifier.
    delta : float
        Confidence level of the bound, in (0, 1).
    gamma : float
        The bound's slack (the paper's gamma), >= 0.
    n_bootstrap : int
        Bootstrap resamples of the held-out scores for the uncertainty; 0 skips it.
    seed : int
        Seed of the bootstrap.
    min_p_mass : float
        Only thresholds with q_P(c) >= min_p_mass are candidates; 0 is the
        paper's BBE. A floor keeps the top bin out of the extreme tail of P,
        where P and the background in U differ most when they come from
        different frames (see `estimate_prior`).

    Returns
    -------
    estimate : float
        In [0, 1].
    uncertainty : float
        Standard deviation of the estimate over bootstrap resamples of the
        held-out P and U scores (threshold re-chosen each time). It covers
        the sampling of the held-out data, not the training of the
        classifier; the paper's bound half-width at c* is far wider on small
        sets (about 0.4 for 40 P and 60 U at delta 0.1) and is not reported.
    """
    p_scores = np.sort(np.asarray(p_scores, dtype=np.float64).ravel())
    u_scores = np.sort(np.asarray(u_scores, dtype=np.float64).ravel())
    for name, scores in (("p_scores", p_scores), ("u_scores", u_scores)):
        if scores.size == 0:
            raise ValueError(f"Invalid {name}: expected at least one score, received none")
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"Invalid {name}: expected finite scores, received NaN or infinity")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"Invalid delta: expected 0 < delta < 1, received {delta}")
    if gamma < 0:
        raise ValueError(f"Invalid gamma: expected gamma >= 0, received {gamma}")
    if not 0.0 <= min_p_mass <= 1.0:
        raise ValueError(f"Invalid min_p_mass: expected 0 <= min_p_mass <= 1, received {min_p_mass}")
    estimate, _ = _bbe_point(p_scores, u_scores, delta, gamma, min_p_mass)
    if n_bootstrap < 1:
        return estimate, float("nan")
    rng = np.random.default_rng(seed)
    resampled = [
        _bbe_point(np.sort(rng.choice(p_scores, p_scores.size)), np.sort(rng.choice(u_scores, u_scores.size)),
                   delta, gamma, min_p_mass)[0]
        for _ in range(n_bootstrap)
    ]
    return estimate, float(np.std(resampled))


def rank_auc(p_scores, u_scores):
    """Mann-Whitney AUC of P over U (ties count half) and its z-score against 0.5."""
    from scipy.stats import rankdata

    n_p, n_u = len(p_scores), len(u_scores)
    ranks = rankdata(np.concatenate([p_scores, u_scores]))
    auc = (ranks[:n_p].sum() - n_p * (n_p + 1) / 2) / (n_p * n_u)
    # Standard deviation of the AUC when P and U come from one distribution.
    null_sd = np.sqrt((n_p + n_u + 1) / (12 * n_p * n_u))
    return float(auc), float((auc - 0.5) / null_sd)
