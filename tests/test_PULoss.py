"""PULoss.py against an independent numpy implementation of the formulas."""

import numpy as np
import pytest
import keras

from PULoss import PNULoss, PULoss, pnu_loss, pu_loss, pu_risk, pu_zero_one_risk


# ---------------------------------------------------------------- reference

def ell(z, loss):
    return 1 / (1 + np.exp(z)) if loss == "sigmoid" else np.log1p(np.exp(-z))


def ref_parts(y, z, prior, loss):
    y, z = np.ravel(y).astype(float), np.ravel(z).astype(float)
    p, u = y == 1, y == -1
    n_p, n_u = max(1, p.sum()), max(1, u.sum())
    rp_plus = ell(z[p], loss).sum() / n_p
    rp_minus = ell(-z[p], loss).sum() / n_p
    ru_minus = ell(-z[u], loss).sum() / n_u
    return prior * rp_plus, ru_minus - prior * rp_minus


def ref_pu(y, z, prior, loss="sigmoid", gamma=1.0, beta=0.0, nnPU=True, balanced=False):
    """(reported value, objective whose gradient is back-propagated).

    Balanced (Su, Chen & Xu 2021, target prior 0.5): the positive risk is
    weighted 0.5 / prior and the negative risk 0.5 / (1 - prior); the nnPU
    correction ascends the unweighted negative risk.
    """
    w_pos, w_neg = (0.5 / prior, 0.5 / (1 - prior)) if balanced else (1.0, 1.0)

    def parts(zz):
        pos, neg = ref_parts(y, zz, prior, loss)
        return w_pos * pos, w_neg * neg

    pos, neg = parts(z)
    if nnPU and neg < -beta:
        # The correction ascends the unweighted negative risk, whatever the class weights.
        return pos - beta, lambda zz: -gamma * ref_parts(y, zz, prior, loss)[1]
    return pos + neg, lambda zz: sum(parts(zz))


def numeric_grad(f, z, eps=1e-4):
    z = np.ravel(z).astype(float)
    grad = np.zeros_like(z)
    for i in range(z.size):
        d = np.zeros_like(z)
        d[i] = eps
        grad[i] = (f(z + d) - f(z - d)) / (2 * eps)
    return grad


def keras_value_and_grad(loss_fn, y, z):
    """The loss and its gradient with respect to the logits, with the backend Keras runs on."""
    z = np.asarray(z, dtype="float32")
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        variable = tf.Variable(z)
        with tf.GradientTape() as tape:
            value = loss_fn(tf.constant(y), variable)
        return float(value), tape.gradient(value, variable).numpy().ravel()
    if backend == "jax":
        import jax

        value, grad = jax.value_and_grad(lambda logits: loss_fn(y, logits))(z)
        return float(value), np.asarray(grad).ravel()
    if backend == "torch":
        import torch

        logits = torch.tensor(z, requires_grad=True)
        value = loss_fn(torch.tensor(y), logits)
        value.backward()
        return float(value.detach()), logits.grad.numpy().ravel()
    pytest.skip(f"no gradient helper for the {backend} backend")


# ------------------------------------------------------------------ batches

RNG = np.random.default_rng(0)
Y_MIXED = np.array([1, -1, -1, 1, -1, -1, -1, 1], dtype="float32")
Z_MIXED = RNG.normal(size=8).astype("float32")
# Positives scored very positive and unlabeled very negative: the empirical
# negative risk Ru- - prior * Rp- is then about -prior, so nnPU corrects.
Z_OVERFIT = np.where(Y_MIXED == 1, 4.0, -4.0).astype("float32")

BATCHES = {
    "mixed": (Y_MIXED, Z_MIXED),
    "overfit": (Y_MIXED, Z_OVERFIT),
    "no_positive": (-np.ones(5, "float32"), RNG.normal(size=5).astype("float32")),
    "no_unlabeled": (np.ones(5, "float32"), RNG.normal(size=5).astype("float32")),
    "int_labels": (Y_MIXED.astype("int32"), Z_MIXED),
    "column_labels": (Y_MIXED.reshape(-1, 1), Z_MIXED.reshape(-1, 1)),
    "column_logits_only": (Y_MIXED, Z_MIXED.reshape(-1, 1)),
}


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("loss", ["sigmoid", "logistic"])
@pytest.mark.parametrize("nnPU", [True, False])
@pytest.mark.parametrize("beta,gamma", [(0.0, 1.0), (0.1, 0.5)])
@pytest.mark.parametrize("balanced", [False, True])
def test_pu_loss_value_and_gradient_match_reference(batch, loss, nnPU, beta, gamma, balanced):
    y, z = BATCHES[batch]
    prior = 0.4 if not balanced else 0.9
    expected_value, objective = ref_pu(y, z, prior, loss, gamma, beta, nnPU, balanced)
    expected_grad = numeric_grad(objective, z)
    fn = PULoss(prior, loss=loss, gamma=gamma, beta=beta, nnPU=nnPU, balanced=balanced)
    value, grad = keras_value_and_grad(fn, y, z)
    assert value == pytest.approx(expected_value, abs=1e-5)
    np.testing.assert_allclose(grad, expected_grad, atol=2e-4)


def test_overfit_batch_takes_the_correction_branch():
    pos, neg = ref_parts(Y_MIXED, Z_OVERFIT, 0.4, "sigmoid")
    assert neg < -0.1
    nn, _ = keras_value_and_grad(PULoss(0.4, beta=0.1), Y_MIXED, Z_OVERFIT)
    u, _ = keras_value_and_grad(PULoss(0.4, nnPU=False), Y_MIXED, Z_OVERFIT)
    assert nn == pytest.approx(pos - 0.1, abs=1e-6)
    assert u == pytest.approx(pos + neg, abs=1e-6)


def test_correction_gradient_ascends_the_negative_risk():
    # Gradient descent on the reported loss must raise the negative risk.
    _, grad = keras_value_and_grad(PULoss(0.4), Y_MIXED, Z_OVERFIT)
    step = Z_OVERFIT - 1.0 * grad
    assert ref_parts(Y_MIXED, step, 0.4, "sigmoid")[1] > ref_parts(Y_MIXED, Z_OVERFIT, 0.4, "sigmoid")[1]


def test_balanced_all_background_model_is_no_longer_cheap():
    # At prior 0.95 the all-background model (every logit large) has the
    # plain nnPU risk 1 - prior = 0.05; balanced, both classes weigh 0.5 and
    # that model costs 0.5, what a coin flip would.
    y = np.array([1] * 20 + [-1] * 20, "float32")
    z = np.full(40, 30.0, "float32")
    assert float(pu_loss(y, z, 0.95)) == pytest.approx(0.05, abs=1e-6)
    assert float(pu_loss(y, z, 0.95, balanced=True)) == pytest.approx(0.5, abs=1e-6)


def test_pu_risk_parts():
    parts = {k: float(v) for k, v in pu_risk(Y_MIXED, Z_MIXED, 0.3).items()}
    pos, neg = ref_parts(Y_MIXED, Z_MIXED, 0.3, "sigmoid")
    assert parts["positive_risk"] == pytest.approx(pos, abs=1e-6)
    assert parts["negative_risk"] == pytest.approx(neg, abs=1e-6)
    assert parts["positive_risk"] == pytest.approx(0.3 * parts["Rp_plus"], abs=1e-7)


def test_labels_are_not_broadcast_against_column_logits():
    # (batch,) labels against (batch, 1) logits must give the 1-D result, not
    # a (batch, batch) average.
    flat = float(pu_loss(Y_MIXED, Z_MIXED, 0.4))
    column = float(pu_loss(Y_MIXED, Z_MIXED.reshape(-1, 1), 0.4))
    assert column == pytest.approx(flat, abs=1e-7)


def test_pu_zero_one_risk_equals_error_on_the_mixture():
    # U = 40% positives and 60% negatives; a classifier right on every P and
    # wrong on one of U's six negatives has zero-one risk 0.6 * 1/6 on U's
    # distribution, which the PU formula recovers without negative labels.
    y = np.array([1] * 5 + [-1] * 10, "float32")
    true_class = np.array([1] * 5 + [1] * 4 + [0] * 6)
    z = np.where(true_class == 1, 2.0, -2.0).astype("float32")
    z[-1] = 2.0  # one negative in U misclassified
    risk = float(pu_zero_one_risk(y, z, prior=0.4))
    err_u = 5 / 10  # 4 positives + 1 wrong negative scored > 0
    assert risk == pytest.approx(2 * 0.4 * 0 + err_u - 0.4)
    assert risk == pytest.approx(0.6 * 1 / 6)


# ---------------------------------------------------------------------- PNU

def ref_pnu(y, z, prior, eta, loss="sigmoid", beta=0.0, gamma=1.0, nnPU=True, gradient=False):
    """Sakai et al.'s PNU risk, eq. 7, with this project's nnPU correction of its PU or NU part.

    The correction is the project's extension: the PU part's negative-risk
    estimate (or the NU part's positive-risk estimate) below -beta is
    reported as ``first - beta`` and back-propagated as ``-gamma`` times
    that estimate, as in Kiryo et al.'s Algorithm 1. With ``gradient`` the
    objective whose gradient is back-propagated is returned instead.
    """
    y, z = np.ravel(y).astype(float), np.ravel(z).astype(float)

    def mean(values, chosen):
        return values[chosen].sum() / max(1, chosen.sum())

    p, n, u = y == 1, y == -1, y == 0
    tn = 1 - prior
    pn = prior * mean(ell(z, loss), p) + tn * mean(ell(-z, loss), n)
    pu_pos, pu_neg = prior * mean(ell(z, loss), p), mean(ell(-z, loss), u) - prior * mean(ell(-z, loss), p)
    nu_neg, nu_pos = tn * mean(ell(-z, loss), n), mean(ell(z, loss), u) - tn * mean(ell(z, loss), n)
    def nn(a, b):
        if nnPU and b < -beta:
            return -gamma * b if gradient else a - beta
        return a + b
    if eta >= 0:
        return (1 - eta) * pn + eta * nn(pu_pos, pu_neg)
    return (1 + eta) * pn - eta * nn(nu_neg, nu_pos)


Y_PNU = np.array([1, -1, 0, 0, 1, -1, 0, 0, 0, 1], "float32")


@pytest.mark.parametrize("eta", [-1.0, -0.5, 0.0, 0.3, 1.0])
@pytest.mark.parametrize("scale", [1.0, 5.0])
@pytest.mark.parametrize("nnPU", [True, False])
def test_pnu_loss_matches_reference(eta, scale, nnPU):
    z = (scale * RNG.normal(size=Y_PNU.size)).astype("float32")
    z[Y_PNU == 1] = scale * 1.5
    value = float(PNULoss(0.4, eta, nnPU=nnPU)(Y_PNU, z))
    assert value == pytest.approx(ref_pnu(Y_PNU, z, 0.4, eta, nnPU=nnPU), abs=1e-5)


@pytest.mark.parametrize("eta", [-0.5, 0.5])
@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_pnu_gradient_matches_reference_with_and_without_the_correction(eta, scale):
    z = (scale * RNG.normal(size=Y_PNU.size)).astype("float32")
    z[Y_PNU == 1] = scale * 1.5
    _, grad = keras_value_and_grad(PNULoss(0.4, eta, gamma=0.5), Y_PNU, z)
    expected = numeric_grad(lambda zz: ref_pnu(Y_PNU, zz, 0.4, eta, gamma=0.5, gradient=True), z)
    np.testing.assert_allclose(grad, expected, atol=2e-4)


def test_pnu_with_eta_one_is_pu_on_pu_labels():
    # eta = 1 drops the PN part: with PNU labels (0 = U) it equals PULoss
    # with PU labels (-1 = U) on the same samples, if there are no negatives.
    y_pnu = np.array([1, 0, 0, 1, 0], "float32")
    y_pu = np.where(y_pnu == 0, -1, 1).astype("float32")
    z = RNG.normal(size=5).astype("float32")
    assert float(pnu_loss(y_pnu, z, 0.3, 1.0)) == pytest.approx(float(pu_loss(y_pu, z, 0.3)), abs=1e-6)


# --------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs,message", [
    (dict(prior=1.2), r"Invalid prior: expected 0 < prior < 1, received 1.2"),
    (dict(prior=0.0), r"Invalid prior: expected 0 < prior < 1, received 0.0"),
    (dict(prior="high"), r"Invalid prior: expected a number in \(0, 1\), received 'high'"),
    (dict(prior=0.5, beta=-0.1), r"Invalid beta: expected beta >= 0, received -0.1"),
    (dict(prior=0.5, gamma=1.5), r"Invalid gamma: expected 0 <= gamma <= 1, received 1.5"),
    (dict(prior=0.5, loss="softmax"), r"Invalid loss: expected one of \('sigmoid', 'logistic'\), received 'softmax'"),
])
def test_pu_loss_rejects_invalid_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PULoss(**kwargs)


@pytest.mark.parametrize("eta,message", [
    (1.5, r"Invalid eta: expected -1 <= eta <= 1, received 1.5"),
    ("x", r"Invalid eta: expected a number in \[-1, 1\], received 'x'"),
])
def test_pnu_loss_rejects_invalid_eta(eta, message):
    with pytest.raises(ValueError, match=message):
        PNULoss(0.5, eta)


def test_sample_weight_is_refused():
    with pytest.raises(ValueError, match="does not support sample_weight"):
        PULoss(0.5)(Y_MIXED, Z_MIXED, sample_weight=np.ones(8))


# ----------------------------------------------------------- serialisation

@pytest.mark.parametrize("loss_obj", [
    PULoss(0.3, loss="logistic", gamma=0.5, beta=0.01, nnPU=False),
    PULoss(0.95, balanced=True),
    PNULoss(0.6, -0.4, loss="sigmoid", gamma=0.9, beta=0.02),
])
def test_get_config_round_trip(loss_obj):
    rebuilt = type(loss_obj).from_config(loss_obj.get_config())
    assert rebuilt.get_config() == loss_obj.get_config()
    assert float(rebuilt(Y_MIXED, Z_MIXED)) == pytest.approx(float(loss_obj(Y_MIXED, Z_MIXED)))


def tiny_model(hidden=0, seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((2,))]
    if hidden:
        layers += [keras.layers.Dense(hidden, activation="relu"), keras.layers.Dense(hidden, activation="relu")]
    layers.append(keras.layers.Dense(1))
    return keras.Sequential(layers)


def test_compiled_model_save_and_reload(tmp_path):
    model = tiny_model()
    model.compile(optimizer="adam", loss=PULoss(0.35, beta=0.05, gamma=0.8))
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert reloaded.loss.get_config() == model.loss.get_config()
    x = RNG.normal(size=(4, 2)).astype("float32")
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0))


# ------------------------------------------------------------ it trains

def gaussian_pu(n_p, n_u, prior, rng, shift=2.0):
    """P ~ N(+shift, I), N ~ N(-shift, I) in 2-D; U mixes them with prior."""
    p = rng.normal(size=(n_p, 2)) + shift
    is_pos = rng.random(n_u) < prior
    u = rng.normal(size=(n_u, 2)) + np.where(is_pos[:, None], shift, -shift)
    x = np.concatenate([p, u]).astype("float32")
    y = np.concatenate([np.ones(n_p), -np.ones(n_u)]).astype("float32")
    return x, y


def pn_error(model, rng, shift=2.0, n=2000):
    x = np.concatenate([rng.normal(size=(n, 2)) + shift, rng.normal(size=(n, 2)) - shift]).astype("float32")
    truth = np.concatenate([np.ones(n), np.zeros(n)])
    pred = model.predict(x, verbose=0, batch_size=1024).ravel() > 0
    return np.mean(pred != truth)


@pytest.mark.parametrize("jit", [False, True])
def test_pu_loss_trains_a_linear_model_to_low_pn_error(jit):
    rng = np.random.default_rng(1)
    x, y = gaussian_pu(200, 600, prior=0.5, rng=rng)
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=PULoss(0.5), jit_compile=jit)
    history = model.fit(x, y, batch_size=100, epochs=30, shuffle=True, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert pn_error(model, rng) < 0.05


def negative_risk_during_training(nnPU, beta=0.0):
    """Full-batch training of a flexible MLP on few samples; the training
    negative risk after every epoch."""
    rng = np.random.default_rng(2)
    x, y = gaussian_pu(15, 60, prior=0.5, rng=rng, shift=0.5)
    model = tiny_model(hidden=64)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=PULoss(0.5, beta=beta, nnPU=nnPU))
    risks = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda *_: risks.append(
        float(pu_risk(y, model(x, training=False), 0.5)["negative_risk"])))
    model.fit(x, y, batch_size=len(x), epochs=300, shuffle=False, verbose=0, callbacks=[record])
    return np.array(risks)


@pytest.mark.slow
def test_upu_negative_risk_goes_below_zero_and_nnpu_does_not():
    upu = negative_risk_during_training(nnPU=False)
    nnpu = negative_risk_during_training(nnPU=True, beta=0.0)
    assert upu[-1] < -0.08
    # Each step that finds the risk below -beta ascends it, so it only dips
    # by about one (momentum) optimiser step at a time and ends back at >= 0.
    assert nnpu.min() > -0.04
    assert nnpu[-1] > -0.01
