"""One-step references of every method class, written from the papers (float64).

For a method built in float64 and put in eval mode (BatchNorm on running statistics, so each
part can be forwarded on its own), ``REFERENCES[type(method)]`` gives what one training step
must return and what the state must be after the optimizer step and
``after_optimizer_step``. A reference reads the method's *parts* (backbone, heads, buffers,
options) and recomputes the paper's formula with the loops of ``references.py`` and the
hand-written pieces below; it calls no loss function of the library.

Each reference is a :class:`Reference`:

    stages(method)              [(name, epochs, optim overrides)] the options ask for
    loaders(method)             per epoch, {loader: (sampler name, images per step, views)}
    prepare(method)             put state in place before the first step (a half-full queue)
    step(method, data, batches, epoch) -> (terms, state_after)
        terms: the named loss terms the step must return
        state_after(before, stepped): the state entries after_optimizer_step must leave,
            given the state before the step and right after the optimizer's step
    predict(method, data, x)    the logits used for evaluation

A method class with no entry here fails tests/methods/test_step_references.py: a new method
gets the generated tests by writing its reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from longtail.methods import METHODS
from longtail.methods.bbn import BBN
from longtail.methods.bcl import BCL
from longtail.methods.ce import CrossEntropy
from longtail.methods.decoupling import Decoupling
from longtail.methods.dscl import DSCL
from longtail.methods.hybrid import Hybrid
from longtail.methods.paco import PaCo
from longtail.methods.proco import ProCo
from longtail.methods.reweighting import Reweighting
from longtail.methods.two_stage import TwoStageSC
from references import (
    bcl_loop,
    dscl_loop,
    mpsc_loop,
    paco_loop,
    pbsd_loop,
    proco_loop,
    psc_loop,
    sup_con_loop,
)

Terms = dict[str, Tensor]
StateAfter = Callable[[dict[str, Tensor], dict[str, Tensor]], dict[str, Tensor]]


def no_state_change(before: dict[str, Tensor], stepped: dict[str, Tensor]) -> dict[str, Tensor]:
    return {}


def section(name: str, **extra: Any) -> dict[str, Any]:
    """The method's options for a 4-epoch run on tiny data (stages of 2 + 2 epochs, DRW and
    DRS switching at epoch 2, a 16-key queue that the loop references can score)."""
    fields = METHODS.get(name).Options.model_fields
    defaults = METHODS.meta(name)["defaults"]
    out: dict[str, Any] = {"name": name}
    if "classifier_epochs" in fields:
        out["classifier_epochs"] = 2
    if "queue_size" in fields:
        out["queue_size"] = 16  # the loop reference scores every slot
    for switch in ("reweight_epoch", "resample_epoch"):
        if defaults.get(switch):
            out[switch] = 2
    if name == "tau-norm":
        out["tau"] = 1.0  # no validation split here
    return {**out, **extra}


# --- formulas ---------------------------------------------------------------------------------


def ce_loop(logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
    """mean_i w_{y_i} (-log softmax(logits_i)[y_i]), sample by sample."""
    terms = []
    for i, y in enumerate(labels.tolist()):
        row = logits[i]
        nll = -(row[y] - torch.log(torch.exp(row - row.max()).sum()) - row.max())
        terms.append(nll * (1.0 if weight is None else weight[y]))
    return torch.stack(terms).mean()


def focal_loop(logits: Tensor, labels: Tensor, gamma: float, weight: Tensor | None) -> Tensor:
    """Lin et al. 2017: -(1 - p_t)^gamma log p_t (class-weighted, Cui et al. 2019)."""
    terms = []
    for i, y in enumerate(labels.tolist()):
        p = torch.exp(logits[i]) / torch.exp(logits[i]).sum()
        terms.append(
            -((1 - p[y]) ** gamma) * torch.log(p[y]) * (1.0 if weight is None else weight[y])
        )
    return torch.stack(terms).mean()


def effective_number_weights(counts: list[int], beta: float) -> Tensor:
    """Cui et al. 2019: w_c = (1 - beta) / (1 - beta^n_c), scaled to sum to C."""
    w = torch.tensor([(1 - beta) / (1 - beta**n) for n in counts], dtype=torch.float64)
    return w * len(counts) / w.sum()


def ldam_margin_values(counts: list[int], max_margin: float) -> Tensor:
    """Cao et al. 2019: m_c = C / n_c^(1/4), C such that the largest margin is max_margin."""
    raw = torch.tensor([n**-0.25 for n in counts], dtype=torch.float64)
    return raw * max_margin / raw.max()


def log_prior(counts: list[int]) -> Tensor:
    n = torch.tensor(counts, dtype=torch.float64)
    return torch.log(n / n.sum())


def curriculum(name: str, epoch: int, epochs: int, value: float) -> float:
    """The hybrid paper's alpha(T), T = epoch + 1 of T_max = epochs."""
    t = (epoch + 1) / epochs
    return {"parabolic": 1 - t**2, "linear": 1 - t, "constant": value}[name]


def unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def cosines(h: Tensor, weight: Tensor) -> Tensor:
    return unit(h) @ unit(weight).T


def linear_logits(classifier: Any, h: Tensor) -> Tensor:
    """W h + b of a linear classifier (``LinearClassifier``), or of a cosine one."""
    if hasattr(classifier, "fc"):
        fc = classifier.fc
        return h @ fc.weight.T + (0 if fc.bias is None else fc.bias)
    return classifier.scale * cosines(h, classifier.weight)


def standardised_logits(method: Any, h: Tensor) -> Tensor:
    """The classifier of a classifier stage: with classifier_bn, (h - mu) / sigma from the
    BatchNorm's running statistics (eval mode), then the linear layer."""
    if getattr(method.opts, "classifier_bn", False):
        norm, linear = method.classifier
        h = (h - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps)
        return linear_logits(linear, h)
    return linear_logits(method.classifier, h)


def embed(head: Any, h: Tensor) -> Tensor:
    """The projection MLP's output on the unit sphere."""
    return unit(head.net(h))


def contrastive_term(loss: str, branch: Any, h: Tensor, labels: Tensor, tau: float) -> Tensor:
    """The hybrid paper's feature-branch loss (SC, PSC, MPSC) or the CE-CE ablation's CE."""
    if loss == "ce":
        return ce_loop(linear_logits(branch.aux_classifier, h), labels)
    z, ys = embed(branch.projector, h), labels.tolist()
    if loss == "sc":
        return sup_con_loop(z, ys, tau)
    protos = unit(branch.prototypes.prototypes)
    return psc_loop(z, ys, protos[:, 0], tau) if loss == "psc" else mpsc_loop(z, ys, protos, tau)


def classifier_stage_optim(o: Any) -> dict[str, Any]:
    """The classifier stage's optimizer settings: its own lr, schedule and decay, no warm-up."""
    return {
        "lr": o.classifier_lr,
        "schedule": o.classifier_schedule,
        "milestones": list(o.classifier_milestones),
        "warmup_epochs": 0.0,
        "weight_decay": o.classifier_weight_decay,
    }


def two_stages(method: Any, first: str) -> list[tuple[str, int, dict]]:
    o, epochs = method.opts, method.cfg.train.epochs
    second = ("classifier", o.classifier_epochs, classifier_stage_optim(o))
    return [second] if o.from_run else [(first, epochs - o.classifier_epochs, {}), second]


def classifier_stage_step(method: Any, batches: Any) -> Terms:
    x, y, _ = batches["cls"]
    ce = ce_loop(standardised_logits(method, method.backbone(x)), y)
    return {"loss": ce, "ce": ce}


# --- the references ---------------------------------------------------------------------------


@dataclass
class Reference:
    step: Callable[[Any, Any, Any, int], tuple[Terms, StateAfter]]
    loaders: Callable[[Any], list[dict[str, tuple[str, int, int]]]]
    stages: Callable[[Any], list[tuple[str, int, dict]]] = field(
        default=lambda m: [("train", m.cfg.train.epochs, {})]
    )
    predict: Callable[[Any, Any, Tensor], Tensor] = field(
        default=lambda m, data, x: linear_logits(m.classifier, m.backbone(x))
    )
    prepare: Callable[[Any], None] = field(default=lambda m: None)


def _per_epoch(method: Any, spec: dict[str, tuple[str | Callable[[int], str], int, int]]):
    """The same loaders in every epoch of the run: (sampler name, images per step, views); a
    callable sampler name is asked for each epoch's."""
    return [
        {name: ((s(e) if callable(s) else s), b, v) for name, (s, b, v) in spec.items()}
        for e in range(method.cfg.train.epochs)
    ]


# CE -----------------------------------------------------------------------------------------


def _ce_step(m, data, batches, epoch):
    x, y, _ = batches["cls"]
    ce = ce_loop(linear_logits(m.classifier, m.backbone(x)), y)
    return {"loss": ce, "ce": ce}, no_state_change


def _train_loader(m):
    t = m.cfg.train
    return _per_epoch(m, {"cls": (t.sampler, t.batch_size, 1)})


# Hybrid networks (Wang et al. 2021) ------------------------------------------------------------


def _hybrid_step(m, data, batches, epoch):
    o = m.opts
    alpha = curriculum(o.curriculum, epoch, m.cfg.train.epochs, o.alpha)
    terms: Terms = {}
    loss = torch.zeros((), dtype=torch.float64)
    if alpha > 0:
        views, y, _ = batches["con"]
        h = torch.cat([m.backbone(v) for v in views])
        terms["con"] = contrastive_term(o.loss, m.features, h, y.repeat(len(views)), o.temperature)
        loss = loss + alpha * terms["con"]
    if alpha < 1:
        x, y, _ = batches["cls"]
        terms["ce"] = ce_loop(linear_logits(m.classifier, m.backbone(x)), y)
        loss = loss + (1 - alpha) * terms["ce"]
    return {**terms, "loss": loss}, no_state_change


def _contrastive_loader(m) -> tuple[str, int, int]:
    o = m.opts
    sampler = "k-per-class" if o.con_k_per_class else o.con_sampler
    return sampler, o.con_batch_size or m.cfg.train.batch_size, len(o.con_transforms)


def _hybrid_loaders(m):
    o, b = m.opts, m.cfg.train.batch_size
    return _per_epoch(
        m,
        {
            "con": _contrastive_loader(m),
            "cls": (o.classifier_sampler, o.classifier_batch_size or b, 1),
        },
    )


# Two-stage SC ---------------------------------------------------------------------------------


def _two_stage_step(m, data, batches, epoch):
    if m.stage.name == "classifier":
        return classifier_stage_step(m, batches), no_state_change
    views, y, _ = batches["con"]
    h = torch.cat([m.backbone(v) for v in views])
    con = contrastive_term(m.opts.loss, m.features, h, y.repeat(len(views)), m.opts.temperature)
    return {"loss": con, "con": con}, no_state_change


def _two_stage_loaders(m, first: dict[str, tuple[str, int, int]]):
    """The first stage's loaders in its epochs, the classifier stage's after."""
    o = m.opts
    second = {"cls": (o.classifier_sampler, o.classifier_batch_size or m.cfg.train.batch_size, 1)}
    out = []
    for name, epochs, _ in two_stages(m, "first"):
        out += [second if name == "classifier" else first] * epochs
    return out


def _predict_standardised(m, data, x):
    return standardised_logits(m, m.backbone(x))


# BCL (Zhu et al. 2022) ------------------------------------------------------------------------


def _bcl_step(m, data, batches, epoch):
    o = m.opts
    (v1, v2, v3), y, _ = batches["views"]
    logits = linear_logits(m.classifier, m.backbone(v1))
    ce = ce_loop(logits + o.logit_adjust_tau * log_prior(data.counts.tolist()), y)
    z = embed(m.projector, torch.cat([m.backbone(v2), m.backbone(v3)]))
    centres = embed(m.centre_head, m.classifier.weight)
    bcl = bcl_loop(z, torch.cat([y, y]).tolist(), centres, o.temperature)
    return {"loss": o.ce_weight * ce + o.bcl_weight * bcl, "ce": ce, "bcl": bcl}, no_state_change


def _bcl_loaders(m):
    return _per_epoch(m, {"views": (m.cfg.train.sampler, m.cfg.train.batch_size, 3)})


# DSCL + PBSD (Xuan & Zhang 2024) --------------------------------------------------------------


def _dscl_prepare(m) -> None:
    """Fill half the queue with labelled unit keys, so the step's loss reads queued keys and
    empty slots alike, and the FIFO pointer starts away from slot 0."""
    queue = m.queue
    size, dim = queue.keys.shape
    gen = torch.Generator().manual_seed(11)
    filled = size // 2
    with torch.no_grad():
        queue.keys[:filled] = unit(torch.randn(filled, dim, generator=gen, dtype=queue.keys.dtype))
        queue.labels[:filled] = torch.arange(filled) % 10
        queue.next.fill_(filled)


def _pbsd_term(m, x_q: Tensor, k: Tensor) -> Tensor:
    """Student: each box cut from the query view (RoIAlign to patch_size) through the query
    encoder; teacher: the same box pooled 2 x 2 from the query's feature map, averaged, through
    the projection head. Boxes are the method's own draw for this step, in image pixels; the
    feature map is smaller by fmap_side / image_side."""
    o = m.opts
    n, _, height, width = x_q.shape
    boxes = m.boxes(n, height, width, x_q.device).to(x_q.dtype)
    owner = torch.arange(n).repeat_interleave(o.patches)[:, None].to(x_q.dtype)
    fmap = m.backbone.forward_features(x_q)
    scale = fmap.shape[-1] / width
    in_fmap = torch.cat([owner, boxes * scale], 1)
    pooled = roi_align(fmap, in_fmap, 2, spatial_scale=1.0, aligned=True).mean(dim=(2, 3))
    teacher = embed(m.head, pooled).view(n, o.patches, -1)
    crops = roi_align(x_q, torch.cat([owner, boxes], 1), o.patch_size, 1.0, aligned=True)
    student = embed(m.head, m.backbone(crops)).view(n, o.patches, -1)
    return pbsd_loop(student, teacher, k, m.queue.keys, m.queue.labels, o.temperature)


def _dscl_step(m, data, batches, epoch):
    if m.stage.name == "classifier":
        return classifier_stage_step(m, batches), no_state_change
    o = m.opts
    (x_q, x_k), y, _ = batches["views"]
    q = embed(m.head, m.backbone(x_q))
    k = embed(m.key_head, m.key_backbone(x_k))
    alpha = 1 / (1 + o.beta)
    queue, queue_labels = m.queue.keys, m.queue.labels.tolist()
    dscl = dscl_loop(q, k, y.tolist(), queue, queue_labels, alpha, o.temperature)
    terms = {"dscl": dscl, "loss": dscl}
    if o.pbsd_weight > 0:
        terms["pbsd"] = _pbsd_term(m, x_q, k)
        terms["loss"] = dscl + o.pbsd_weight * terms["pbsd"]
    keys, labels = k.detach().clone(), y.clone()

    def state_after(before, stepped):
        """MoCo: every parameter of the key encoder (backbone and head) moves to the query's
        by momentum; then the step's keys, with their labels, overwrite the oldest slots."""
        mom, out = o.momentum, {}
        for key_part, query_part in (("key_backbone", "backbone"), ("key_head", "head")):
            for name, _ in getattr(m, query_part).named_parameters():
                old = before[f"{key_part}.{name}"]
                out[f"{key_part}.{name}"] = mom * old + (1 - mom) * stepped[f"{query_part}.{name}"]
        return {**out, **queue_after(before, keys, labels)}

    return terms, state_after


def _dscl_loaders(m):
    return _two_stage_loaders(m, {"views": (m.cfg.train.sampler, m.cfg.train.batch_size, 2)})


# PaCo / GPaCo (Cui et al. 2021, 2023) --------------------------------------------------------


def _paco_step(m, data, batches, epoch):
    o = m.opts
    (x_q, x_k), y, _ = batches["views"]
    prior = o.logit_adjust_tau * m.log_prior.to(x_q.dtype)
    queue, queue_labels = m.queue.keys, m.queue.labels.tolist()
    if o.momentum_encoder:
        h = m.backbone(x_q)
        z, centres, labels = embed(m.head, h), linear_logits(m.classifier, h) + prior, y.tolist()
        keys = embed(m.key_head, m.key_backbone(x_k))
        bank, bank_labels = torch.cat([keys, queue]), y.tolist() + queue_labels
    else:
        h = torch.cat([m.backbone(x_q), m.backbone(x_k)])
        z, centres = embed(m.head, h), linear_logits(m.classifier, h) + prior
        labels, keys = y.tolist() * 2, embed(m.head, h[len(y) :]).detach()
        bank, bank_labels = queue, queue_labels
    paco = paco_loop(z, centres, labels, bank, bank_labels, o.alpha, o.temperature)
    keys, key_labels = keys.detach().clone(), y.clone()

    def state_after(before, stepped):
        """PaCo: the key encoder moves to the encoder by momentum; both: the keys (PaCo's
        momentum keys, GPaCo's second views) overwrite the oldest queue slots."""
        out = {}
        if o.momentum_encoder:
            for key_part, part in (("key_backbone", "backbone"), ("key_head", "head")):
                for name, _ in getattr(m, part).named_parameters():
                    old = before[f"{key_part}.{name}"]
                    new = stepped[f"{part}.{name}"]
                    out[f"{key_part}.{name}"] = o.momentum * old + (1 - o.momentum) * new
        return {**out, **queue_after(before, keys, key_labels)}

    return {"loss": paco, "paco": paco}, state_after


def queue_after(before: dict[str, Tensor], keys: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """A FIFO queue of labelled keys after ``keys`` were pushed: the oldest slots overwritten
    (only the last ``size`` keys kept when more come), the pointer moved on."""
    queue, queue_labels = before["queue.keys"].clone(), before["queue.labels"].clone()
    size, start = len(queue), int(before["queue.next"])
    out: dict[str, Tensor] = {}
    if size:
        skip = max(0, len(keys) - size)
        for i in range(skip, len(keys)):
            slot = (start + i - skip) % size
            queue[slot], queue_labels[slot] = keys[i], labels[i]
        out["queue.next"] = torch.tensor((start + min(len(keys), size)) % size)
    out["queue.keys"], out["queue.labels"] = queue, queue_labels
    return out


def _paco_loaders(m):
    return _per_epoch(m, {"views": (m.cfg.train.sampler, m.cfg.train.batch_size, 2)})


# ProCo (Du et al. 2024) -----------------------------------------------------------------------


def _running_means(m, z: Tensor, labels: list[int]) -> dict[str, Tensor]:
    """Each class's mean of every unit feature seen: the kept mean over ``count`` features
    and the step's, for the estimate and for the epoch's."""
    vmf, out = m.vmf, {}
    for mean_name, count_name in (("mean", "count"), ("epoch_mean", "epoch_count")):
        mean, count = getattr(vmf, mean_name).clone(), getattr(vmf, count_name).clone()
        for c in range(len(count)):
            mine = [z[i] for i, y in enumerate(labels) if y == c]
            if mine:
                mean[c] = (mean[c] * count[c] + sum(mine)) / (count[c] + len(mine))
                count[c] += len(mine)
        out[f"vmf.{mean_name}"], out[f"vmf.{count_name}"] = mean, count
    return out


def _proco_step(m, data, batches, epoch):
    o = m.opts
    (x_cls, x_2, x_3), y, _ = batches["views"]
    prior = o.logit_adjust_tau * m.log_prior.to(x_cls.dtype)
    ce = ce_loop(linear_logits(m.classifier, m.backbone(x_cls)) + prior, y)
    z = torch.cat([embed(m.head, m.backbone(x_2)), embed(m.head, m.backbone(x_3))])
    labels = y.tolist() * 2
    stats = _running_means(m, z.detach(), labels)
    mean = stats["vmf.mean"]
    r = torch.linalg.vector_norm(mean, dim=1)
    p = mean.shape[1]
    kappa = r * (p - r**2) / (1 - r**2)  # Banerjee et al. 2005
    proco = proco_loop(z, labels, mean / r[:, None], kappa, prior, o.temperature)
    terms = {"loss": ce + o.proco_weight * proco, "ce": ce, "proco": proco}
    return terms, lambda before, stepped: stats


def _proco_loaders(m):
    return _per_epoch(m, {"views": (m.cfg.train.sampler, m.cfg.train.batch_size, 3)})


def _proco_prepare(m) -> None:
    """Statistics as after an epoch: the steps of the walk start epochs, so each rolls these
    over (the epoch's means become the estimate) before its step."""
    g = torch.Generator().manual_seed(5)
    vmf = m.vmf
    with torch.no_grad():
        vmf.epoch_mean.copy_(0.8 * unit(torch.randn(vmf.epoch_mean.shape, generator=g,
                                                    dtype=vmf.epoch_mean.dtype)))  # fmt: skip
        vmf.epoch_count.copy_(torch.arange(len(vmf.epoch_count)) % 3)  # some classes unseen


# BBN (Zhou et al. 2020) -----------------------------------------------------------------------


def _bbn_features(m, x_c: Tensor, x_r: Tensor) -> tuple[Tensor, Tensor]:
    b = m.backbone
    f_c = b.forward_head(b.last_stage(b.forward_trunk(x_c)))
    f_r = b.forward_head(m.rebalancing(b.forward_trunk(x_r)))
    return f_c, f_r


def _bbn_step(m, data, batches, epoch):
    x_c, y_c, _ = batches["conventional"]
    x_r, y_r, _ = batches["rebalancing"]
    a = curriculum(m.opts.curriculum, epoch, m.cfg.train.epochs, 0.5)
    f_c, f_r = _bbn_features(m, x_c, x_r)
    logits = linear_logits(m.classifier, torch.cat([a * f_c, (1 - a) * f_r], 1))
    ce_c, ce_r = ce_loop(logits, y_c), ce_loop(logits, y_r)
    terms = {"loss": a * ce_c + (1 - a) * ce_r, "ce_conventional": ce_c, "ce_rebalancing": ce_r}
    return terms, no_state_change


def _bbn_predict(m, data, x):
    f_c, f_r = _bbn_features(m, x, x)
    return linear_logits(m.classifier, torch.cat([0.5 * f_c, 0.5 * f_r], 1))


def _bbn_loaders(m):
    o, b = m.opts, m.cfg.train.batch_size
    return _per_epoch(
        m,
        {
            "conventional": (o.conventional_sampler, b, 1),
            "rebalancing": (o.rebalancing_sampler, b, 1),
        },
    )


# Decoupling (Kang et al. 2020) ----------------------------------------------------------------


def _lws_logits(m, h: Tensor) -> Tensor:
    fc = m.classifier.fc
    return m.scales.scales * (h @ fc.weight.T) + fc.bias


def _decoupling_step(m, data, batches, epoch):
    x, y, _ = batches["cls"]
    h = m.backbone(x)
    if m.stage.name == "classifier":
        logits = _lws_logits(m, h) if m.opts.kind == "lws" else linear_logits(m.classifier, h)
    else:
        logits = linear_logits(m.classifier, h)
    ce = ce_loop(logits, y)
    return {"loss": ce, "ce": ce}, no_state_change


def _decoupling_stages(m):
    if m.opts.kind == "tau-norm":
        return [("joint", m.cfg.train.epochs, {})]
    return two_stages(m, "joint")


def _decoupling_predict(m, data, x):
    h, kind = m.backbone(x), m.opts.kind
    if kind == "lws":
        return _lws_logits(m, h)
    if kind == "tau-norm":  # w_c / ||w_c||^tau, no bias
        w = m.classifier.fc.weight
        return h @ (w / w.norm(dim=1, keepdim=True) ** float(m.tau)).T
    return linear_logits(m.classifier, h)


def _decoupling_loaders(m):
    t = m.cfg.train
    first = {"cls": (t.sampler, t.batch_size, 1)}
    if m.opts.kind == "tau-norm":
        return _per_epoch(m, first)
    return _two_stage_loaders(m, first)


# Re-weighting baselines -----------------------------------------------------------------------


def _reweighting_step(m, data, batches, epoch):
    o = m.opts
    x, y, _ = batches["cls"]
    counts = data.counts.tolist()
    h = m.backbone(x)
    weighted = o.weighting == "class-balanced" and epoch >= o.reweight_epoch
    w = effective_number_weights(counts, o.beta) if weighted else None
    if o.loss == "ldam":  # Cao et al.: s (cos - m_y) on the true class
        cos = cosines(h, m.classifier.weight)
        margins = ldam_margin_values(counts, o.max_margin)
        shifted = cos - F.one_hot(y, len(counts)).double() * margins[y, None]
        loss = ce_loop(o.scale * shifted, y, w)
    else:
        logits = linear_logits(m.classifier, h)
        if o.loss == "focal":
            loss = focal_loop(logits, y, o.gamma, w)
        elif o.loss == "logit-adjust":
            loss = ce_loop(logits + o.tau * log_prior(counts), y, w)
        elif o.loss == "balanced-softmax":  # Ren et al.: + log n_c
            loss = ce_loop(logits + torch.log(torch.tensor(counts, dtype=torch.float64)), y, w)
        else:
            loss = ce_loop(logits, y, w)

    def state_after(before, stepped):
        """MaxNorm (Alshammari et al. 2022): each class's weight row projected into the ball."""
        if o.classifier_max_norm is None:
            return {}
        key = "classifier.fc.weight" if "classifier.fc.weight" in stepped else "classifier.weight"
        w_new = stepped[key]
        norms = w_new.norm(dim=1, keepdim=True)
        return {key: w_new * torch.clamp(o.classifier_max_norm / norms, max=1.0)}

    return {"loss": loss, o.loss: loss}, state_after


def _reweighting_predict(m, data, x):
    o, h = m.opts, m.backbone(x)
    if o.loss == "ldam":  # the cosines at the trained scale, without margins
        logits = o.scale * cosines(h, m.classifier.weight)
    else:
        logits = linear_logits(m.classifier, h)
    if o.posthoc_tau:  # Menon et al.'s post-hoc form: minus tau log prior
        logits = logits - o.posthoc_tau * log_prior(data.counts.tolist())
    return logits


def _reweighting_loaders(m):
    o, t = m.opts, m.cfg.train

    def sampler(epoch: int) -> str:  # DRS: another sampler from resample_epoch on
        if o.resample_epoch is not None and epoch >= o.resample_epoch:
            return o.resample_sampler
        return t.sampler

    return _per_epoch(m, {"cls": (sampler, t.batch_size, 1)})


REFERENCES: dict[type, Reference] = {
    CrossEntropy: Reference(_ce_step, _train_loader),
    Hybrid: Reference(_hybrid_step, _hybrid_loaders),
    TwoStageSC: Reference(
        _two_stage_step,
        lambda m: _two_stage_loaders(m, {"con": _contrastive_loader(m)}),
        stages=lambda m: two_stages(m, "features"),
        predict=_predict_standardised,
    ),
    BCL: Reference(_bcl_step, _bcl_loaders),
    DSCL: Reference(
        _dscl_step,
        _dscl_loaders,
        stages=lambda m: two_stages(m, "features"),
        predict=_predict_standardised,
        prepare=_dscl_prepare,
    ),
    BBN: Reference(_bbn_step, _bbn_loaders, predict=_bbn_predict),
    PaCo: Reference(_paco_step, _paco_loaders, prepare=_dscl_prepare),
    ProCo: Reference(_proco_step, _proco_loaders, prepare=_proco_prepare),
    Decoupling: Reference(
        _decoupling_step,
        _decoupling_loaders,
        stages=_decoupling_stages,
        predict=_decoupling_predict,
    ),
    Reweighting: Reference(_reweighting_step, _reweighting_loaders, predict=_reweighting_predict),
}
